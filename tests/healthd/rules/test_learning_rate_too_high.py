"""healthd.rules.learning_rate_too_high: large update ratios, or a loss that rises after an LR jump."""

from __future__ import annotations

import pytest

from healthd.rules.learning_rate_too_high import LearningRateTooHigh
from healthd.wire.schema import Severity
from tests.healthd.factories import healthy_loss, steps, window


def test_lr_too_high_update_ratio() -> None:
    f = LearningRateTooHigh().evaluate(window(steps(10, update_ratio=0.3, lr=[1.0], loss=1.0)))
    assert f is not None and f.severity is None  # warning
    f = LearningRateTooHigh().evaluate(window(steps(10, update_ratio=0.03, lr=[1e-3], loss=1.0)))
    assert f is not None and f.severity is Severity.INFO
    assert LearningRateTooHigh().evaluate(window(steps(10, update_ratio=1e-3, lr=[1e-3], loss=1.0))) is None


def test_lr_too_high_loss_after_lr_jump() -> None:
    lrs = [[0.01]] * 6 + [[0.1]] * 6
    losses = [1.0] * 6 + [1.5, 2.5, 3.0, 3.2, 3.5, 4.0]
    f = LearningRateTooHigh().evaluate(window(steps(12, lr=lrs, loss=losses, update_ratio=1e-3)))
    assert f is not None and f.evidence["lr_after"] == pytest.approx(0.1)
    # A warm-up ramp with a falling loss is not a finding.
    ramp = [[0.001 * (i + 1)] for i in range(12)]
    assert LearningRateTooHigh().evaluate(window(steps(12, lr=ramp, loss=healthy_loss[:12], update_ratio=1e-3))) \
        is None
