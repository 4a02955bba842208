"""healthd.rules.initial_loss_unexpected: a step-0 loss far from ln(C)."""

from __future__ import annotations

import pytest

from healthd.rules.initial_loss_unexpected import InitialLossUnexpected, InitialLossUnexpectedConfig
from healthd.wire.schema import Hints, Severity
from tests.healthd.factories import attach, ce, fires, steps, window

WARN = Severity.WARNING

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (InitialLossUnexpected(), window(steps(3, loss=12.0), attach(hints=Hints(num_classes=10))), Severity.WARNING),
    # above chance, ln(10) = 2.30: an output layer scaled 30x starts at 1.85-2.55x chance, healthy inits at
    # 0.98-1.08x; from 1.5x it warns (warn_above_factor)
    (InitialLossUnexpected(), window(steps(3, loss=3.9), attach(hints=Hints(num_classes=10))), WARN),  # 1.69x
    (InitialLossUnexpected(), window(steps(3, loss=4.26), attach(hints=Hints(num_classes=10))), WARN),  # 1.85x
    (InitialLossUnexpected(), window(steps(3, loss=3.3), attach(hints=Hints(num_classes=10))), False),  # 1.43x
    (InitialLossUnexpected(), window(steps(3, loss=2.49), attach(hints=Hints(num_classes=10))), False),  # 1.08x
    (InitialLossUnexpected(InitialLossUnexpectedConfig(warn_above_factor=2.0)),  # the threshold is config
     window(steps(3, loss=3.9), attach(hints=Hints(num_classes=10))), Severity.INFO),
    # below chance: info from 1/1.5, and never more (trained weights loaded where healthd cannot see it)
    (InitialLossUnexpected(), window(steps(3, loss=1.3), attach(hints=Hints(num_classes=10))), Severity.INFO),
    (InitialLossUnexpected(), window(steps(3, loss=1.0), attach(hints=Hints(num_classes=10))), Severity.INFO),
    (InitialLossUnexpected(), window(steps(3, loss=2.35), attach(hints=Hints(num_classes=10))), False),
    (InitialLossUnexpected(), window(steps(3, loss=12.0, loss_inputs=[[ce()]] * 3)), Severity.WARNING),  # C from shape
    (InitialLossUnexpected(), window(steps(3, loss=12.0)), False),  # no class count: not a classifier
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
