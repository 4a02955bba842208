"""healthd.rules.initial_loss_unexpected on a stream with ``loss_kind="adversarial"``: silent.

A discriminator's step-0 loss is a sum of two binary cross-entropies (about 2 ln 2), and a classifier
head inside a GAN (an auxiliary-classifier discriminator) says nothing about ln(C) for the adversarial
loss reported; the same step-0 loss on a minimized classifier stream still fires.
"""

from __future__ import annotations

import pytest

from healthd.rules.initial_loss_unexpected import InitialLossUnexpected
from healthd.wire.schema import Hints, Severity
from tests.healthd.factories import attach, ce, fires, steps, window

CASES = [
    # window, expected (False: no finding; a Severity: fires at it)
    (window(steps(3, loss=12.0), attach(hints=Hints(num_classes=10))), Severity.WARNING),  # control
    (window(steps(3, loss=12.0), attach(hints=Hints(num_classes=10, loss_kind="adversarial"))), False),
    (window(steps(3, loss=12.0, loss_inputs=[[ce()]] * 3), attach(hints=Hints(loss_kind="adversarial"))), False),
    (window(steps(3, loss=1.39), attach(hints=Hints(num_classes=2, loss_kind="adversarial"))), False),
]


@pytest.mark.parametrize(("w", "expected"), CASES, ids=[f"case-{i}" for i in range(len(CASES))])
def test_table(w: object, expected: object) -> None:
    assert fires(InitialLossUnexpected(), w) == expected
