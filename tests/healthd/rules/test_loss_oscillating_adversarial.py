"""healthd.rules.loss_oscillating on a stream with ``loss_kind="adversarial"`` (a GAN player): silent.

Alternating updates make each player's loss swing step to step as the other moves; on a minimized
stream the same swings with no net progress still fire.
"""

from __future__ import annotations

import pytest

from healthd.rules.loss_oscillating import LossOscillating
from healthd.wire.schema import Hints, Severity
from tests.healthd.factories import attach, fires, steps, window

ADVERSARIAL = attach(hints=Hints(loss_kind="adversarial"))
MINIMIZED = attach(hints=Hints(loss_kind="minimized"))
swinging = [2.0 if i % 2 else 0.4 for i in range(30)]

CASES = [
    # window, expected (False: no finding; a Severity: fires at it)
    (window(steps(30, loss=swinging), MINIMIZED), Severity.WARNING),  # control
    (window(steps(30, loss=swinging), ADVERSARIAL), False),
    (window(steps(30, loss=[3.0 if i % 3 == 0 else 0.3 for i in range(30)]), ADVERSARIAL), False),
]


@pytest.mark.parametrize(("w", "expected"), CASES, ids=[f"case-{i}" for i in range(len(CASES))])
def test_table(w: object, expected: object) -> None:
    assert fires(LossOscillating(), w) == expected
