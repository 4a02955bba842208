"""healthd.rules.learning_rate_too_low: tiny update ratios while the LR is steady at its peak."""

from __future__ import annotations

from healthd.rules.learning_rate_too_low import LearningRateTooLow
from tests.healthd.factories import steps, window


def test_lr_too_low_only_when_lr_steady_at_peak() -> None:
    w = window(steps(50, update_ratio=1e-7, grad_norm=1.0, lr=[1e-7]), lr_peak=1e-7)
    assert LearningRateTooLow().evaluate(w) is not None
    # Cosine tail: LR far below its peak -> skipped.
    assert LearningRateTooLow().evaluate(
        window(steps(50, update_ratio=1e-7, grad_norm=1.0, lr=[1e-7]), lr_peak=1e-2)) is None
    # Warm-up: LR moving within the window -> skipped.
    ramp = [[1e-7 * (i + 1)] for i in range(50)]
    assert LearningRateTooLow().evaluate(window(steps(50, update_ratio=1e-7, grad_norm=1.0, lr=ramp))) is None
    assert LearningRateTooLow().evaluate(
        window(steps(50, update_ratio=1e-3, grad_norm=1.0, lr=[1e-3]), lr_peak=1e-3)) is None


def test_lr_too_low_is_not_blamed_for_a_diverged_run() -> None:
    # Weights blew up: updates are tiny next to them, but the loss is far above where it started.
    blown = steps(50, update_ratio=1e-9, grad_norm=1.0, lr=[10.0], loss=[2.0] * 20 + [50.0] * 30)
    assert LearningRateTooLow().evaluate(window(blown, lr_peak=10.0)) is None
    slow = steps(50, update_ratio=1e-9, grad_norm=1.0, lr=[10.0], loss=[2.0] * 20 + [1.99] * 30)
    assert LearningRateTooLow().evaluate(window(slow, lr_peak=10.0)) is not None
