"""healthd.rules.loss_oscillating: step-to-step loss swings as large as the loss, with no net progress."""

from __future__ import annotations

import pytest

from healthd.rules.loss_oscillating import LossOscillating
from healthd.wire.schema import Severity
from tests.healthd.factories import falling, fires, steps, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (LossOscillating(), window(steps(30, loss=[2.0 if i % 2 else 0.4 for i in range(30)])), Severity.WARNING),
    (LossOscillating(), window(steps(30, loss=falling[:30])), False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
