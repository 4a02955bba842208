"""LearningRateTooLow does not mistake damage for its cause: tiny updates because gradients stopped
flowing, or after oversized updates killed the network, are not a learning rate too low."""

from __future__ import annotations

from typing import Any

import pytest

from healthd.rules.learning_rate_too_low import LearningRateTooLow
from tests.healthd.factories import steps, window

N = 80


def _ratios(early: float) -> list[float]:
    return [early if i < 30 else 1e-6 for i in range(N)]


def _layers(dead: bool) -> list[dict[str, Any]]:
    return [{"a": {"grad_norm": 0.5}, "b": {"grad_norm": 0.0 if dead and i >= 60 else 0.5}} for i in range(N)]


@pytest.mark.parametrize(("early", "dead", "fires"), [
    (1e-6, False, True),  # tiny updates all along with live gradients: too low
    (1e-6, True, False),  # a layer gets no gradient: GradientsNotFlowing's finding
    (0.5, False, False),  # updates were oversized earlier: the damage of a learning rate too high
    (0.05, False, True),  # a healthy-sized start is no such history
])
def test_too_low_stays_silent_on_damage(early: float, dead: bool, fires: bool) -> None:
    w = window(steps(N, update_ratio=_ratios(early), loss=2.3, lr=[1e-3], grad_norm=0.5, layers=_layers(dead)))
    assert (LearningRateTooLow().evaluate(w) is not None) is fires
