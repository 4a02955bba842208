"""healthd.rules.non_finite_values: a NaN or inf in the loss, gradients or parameters, unless GradScaler skipped it."""

from __future__ import annotations

import math

import pytest

from healthd.rules.non_finite_values import NonFiniteValues
from healthd.wire.schema import NonFinite
from tests.healthd.factories import step, steps, window

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("last", "fires"),
    [
        (dict(loss=NAN, nonfinite=NonFinite(loss=1)), True),
        (dict(loss=1.0, grad_norm=INF, nonfinite=NonFinite(grads=2)), True),
        (dict(loss=1.0, nonfinite=NonFinite(params=1)), True),
        (dict(loss=1.0, grad_norm=1.0), False),
        # GradScaler skipped a step with inf grads: its job, not a finding.
        (dict(loss=1.0, grad_norm=INF, nonfinite=NonFinite(grads=1), step_skipped=True), False),
    ],
)
def test_non_finite(last: dict, fires: bool) -> None:
    w = window([*steps(5, loss=1.0, grad_norm=1.0), step(5, **last)])
    f = NonFiniteValues().evaluate(w)
    assert (f is not None) is fires
    if f:
        assert f.step == 5 and f.rank == 0 and "step 5" in f.summary
