"""healthd.rules.exploding_gradients: a gradient-norm spike relative to the recent median."""

from __future__ import annotations

import pytest

from healthd.rules.exploding_gradients import ExplodingGradients
from healthd.wire.schema import Severity
from tests.healthd.factories import step, steps, window


def test_exploding_fires_on_spike_relative_to_median() -> None:
    # A spike with evidence it matters (the next step is still over 5x): one lone spike is not enough.
    w = window([*steps(20, grad_norm=1.0), step(20, grad_norm=15.0, layers={"fc": {"grad_norm": 14.0}}),
                step(21, grad_norm=6.0)])
    f = ExplodingGradients().evaluate(w)
    assert f is not None and f.evidence["factor"] == pytest.approx(15.0) and f.layer == "fc"
    assert f.severity is None  # default (warning) below the critical factor


def test_exploding_critical_and_quiet_cases() -> None:
    assert ExplodingGradients().evaluate(window([*steps(20, grad_norm=1.0), step(20, grad_norm=500.0)])).severity \
        is Severity.CRITICAL
    assert ExplodingGradients().evaluate(window([*steps(20, grad_norm=1.0), step(20, grad_norm=5.0)])) is None
    assert ExplodingGradients().evaluate(window([*steps(5, grad_norm=1.0), step(5, grad_norm=100.0)])) is None
