"""healthd.rules.initial_loss_unexpected: a step-0 loss far from ln(C)."""

from __future__ import annotations

import pytest

from healthd.rules.initial_loss_unexpected import InitialLossUnexpected
from healthd.wire.schema import Hints, Severity
from tests.healthd.factories import attach, ce, fires, steps, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (InitialLossUnexpected(), window(steps(3, loss=12.0), attach(hints=Hints(num_classes=10))), Severity.WARNING),
    (InitialLossUnexpected(), window(steps(3, loss=3.9), attach(hints=Hints(num_classes=10))), Severity.INFO),
    (InitialLossUnexpected(), window(steps(3, loss=2.35), attach(hints=Hints(num_classes=10))), False),
    (InitialLossUnexpected(), window(steps(3, loss=12.0, loss_inputs=[[ce()]] * 3)), Severity.WARNING),  # C from shape
    (InitialLossUnexpected(), window(steps(3, loss=12.0)), False),  # no class count: not a classifier
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
