"""healthd.rules.gradients_not_flowing: layers whose gradient is None or zero for several steps while others learn."""

from __future__ import annotations

import pytest

from healthd.rules.gradients_not_flowing import GradientsNotFlowing
from healthd.wire.schema import Severity
from tests.healthd.factories import fires, steps, window

OK = {"grad_norm": 1.0}
GONE = {"grad_missing": True}
ZERO = {"grad_norm": 0.0}


CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (GradientsNotFlowing(), window(steps(3, layers=[{"a": OK, "b": GONE}] * 3)), Severity.WARNING),
    (GradientsNotFlowing(), window(steps(3, layers=[{"a": OK, "b": ZERO}] * 3)), Severity.WARNING),
    (GradientsNotFlowing(), window(steps(3, layers=[{"a": OK, "b": GONE}, {"a": OK, "b": OK}, {"a": OK, "b": GONE}])),
     False),
    (GradientsNotFlowing(), window(steps(3, layers=[{"a": GONE, "b": GONE}] * 3)), False),  # WeightsNotUpdating's
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
