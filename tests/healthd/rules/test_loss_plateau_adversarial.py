"""healthd.rules.loss_plateau on a stream with ``loss_kind="adversarial"`` (a GAN player): silent.

An adversarial loss hovering at its equilibrium (a discriminator near ln 4 = 1.386) is the healthy
state, not a plateau; the same series on a minimized stream still fires, so the hint is what silences it.
"""

from __future__ import annotations

import math

import pytest

from healthd.rules.loss_plateau import LossPlateau
from healthd.wire.schema import Hints, Severity
from tests.healthd.factories import attach, fires, steps, window

ADVERSARIAL = attach(hints=Hints(loss_kind="adversarial"))
MINIMIZED = attach(hints=Hints(loss_kind="minimized"))
at_equilibrium = [1.386 + 0.05 * math.sin(i * 1.7) for i in range(40)]  # D's loss near ln 4, flat
rising_g = [0.7 + 0.04 * i + 0.1 * math.sin(i) for i in range(60)]  # the generator's, climbing as D learns

CASES = [
    # window, expected (False: no finding; a Severity: fires at it)
    (window(steps(40, loss=at_equilibrium), MINIMIZED), Severity.WARNING),  # control: the shape does fire
    (window(steps(40, loss=at_equilibrium), ADVERSARIAL), False),
    (window(steps(60, loss=rising_g), ADVERSARIAL), False),
    (window(steps(60, loss=[2.0 + 0.01 * (i % 2) for i in range(60)]), ADVERSARIAL), False),  # flat from step 0
]


@pytest.mark.parametrize(("w", "expected"), CASES, ids=[f"case-{i}" for i in range(len(CASES))])
def test_table(w: object, expected: object) -> None:
    assert fires(LossPlateau(), w) == expected
