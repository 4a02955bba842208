"""healthd.rules.loss_diverging on a stream with ``loss_kind="adversarial"`` (a GAN player): silent.

A generator's loss rises as its discriminator gets better (the issue's "1.41 vs best 0.561" on a
healthy GAN); that is the game, not divergence. The same series on a minimized stream still fires.
"""

from __future__ import annotations

import pytest

from healthd.rules.loss_diverging import LossDiverging
from healthd.wire.schema import Hints, Severity
from tests.healthd.factories import attach, fires, steps, window

ADVERSARIAL = attach(hints=Hints(loss_kind="adversarial"))
MINIMIZED = attach(hints=Hints(loss_kind="minimized"))
diverging = [2.0 - 0.05 * i for i in range(20)] + [1.0 * 1.3**i for i in range(15)]
g_after_d_improves = [0.561 + (0.0 if i < 15 else 0.06 * (i - 15)) for i in range(30)]  # 0.561 -> 1.4

CASES = [
    # window, expected (False: no finding; a Severity: fires at it)
    (window(steps(35, loss=diverging), MINIMIZED), Severity.CRITICAL),  # control: 1.3x a step, far above best
    (window(steps(35, loss=diverging), ADVERSARIAL), False),
    (window(steps(30, loss=g_after_d_improves), ADVERSARIAL), False),
]


@pytest.mark.parametrize(("w", "expected"), CASES, ids=[f"case-{i}" for i in range(len(CASES))])
def test_table(w: object, expected: object) -> None:
    assert fires(LossDiverging(), w) == expected
