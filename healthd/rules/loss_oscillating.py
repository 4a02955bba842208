"""LossOscillating: the loss swings up and down instead of descending."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ForSteps,
    Rule,
    WindowedConfig,
    fmt,
    loss_classes,
    median,
    sound_steps,
    trained_start,
)
from healthd.state.windows import RankWindow


class LossOscillatingConfig(WindowedConfig):
    window_steps: int = Field(default=20, ge=6, description="steps whose swings are judged")
    warmup_steps: int = Field(default=5, ge=0, description="first steps never judged")
    swing_ratio: float = Field(default=0.5, gt=0, description="median |step-to-step change| / median loss that counts")
    min_level_fraction: float = Field(
        default=0.25, ge=0, description="only judged while the loss is above this fraction of its initial level"
    )
    for_steps: ForSteps = 3


class LossOscillating(Rule[RankWindow, LossOscillatingConfig]):
    """Step-to-step loss changes are as large as the loss itself, and the window made no net progress.

    Why: a loss that jumps by a large fraction of itself every step, without
    trending down, is not learning: the step size overshoots the valley (learning
    rate too high, momentum too high, accumulating gradients) or the batches are
    inconsistent (corrupted or mislabeled shards).
    Source: "error oscillates: learning rate too high, corrupted data", J. Tobin,
    "Troubleshooting Deep Neural Networks" (Full Stack Deep Learning, 2019).
    Thresholds (over the last ``window_steps`` (20)): median
    |L_t - L_{t-1}| > ``swing_ratio`` (0.5) x median L; the median of the last 5
    losses is not lower than the first 5's by more than one median swing; and
    the loss is still above ``min_level_fraction`` (1/4) of its initial level,
    since near convergence minibatch noise is large relative to a small loss. A
    fine-tune starts near convergence, so with C known (``num_classes``, or the
    inspected cross-entropy input) its level is judged against chance, ln(C), when
    that is higher. A run is a fine-tune by the attach hint ``fine_tune`` or, when
    nothing told healthd (a plain ``load_state_dict`` before training), by its
    step-0 loss below 2/3 of chance (``healthd.rules.base.trained_start``).

    Not for a stream whose loss training does not drive down (the attach hint ``loss_kind="adversarial"``:
    a GAN's generator or discriminator loss rises whenever the other player improves): not judged.
    """

    name: ClassVar[str] = "LossOscillating"
    Config = LossOscillatingConfig
    advice: ClassVar[str] = (
        "Lower the learning rate (3-10x) or the momentum, clip gradients, check that zero_grad() runs every "
        "step, and look for corrupted or shuffled-label batches (log the loss per batch/shard)."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        if not window.meta.loss_minimized:
            return None  # an adversarial loss (a GAN player's) has no shape to judge
        cfg = self.config
        # only the steps since any NaN/Inf: a window straddling one says nothing about its shape
        losses = window.values_from_step("loss", sound_steps(window, cfg.window_steps), cfg.warmup_steps)
        if len(losses) < cfg.window_steps or min(losses) < 0:
            return None
        level = median(losses)
        swing = median([abs(b - a) for a, b in zip(losses, losses[1:], strict=False)])
        if level <= 0 or swing <= cfg.swing_ratio * level:
            return None
        progress = median(losses[:5]) - median(losses[-5:])
        if progress > swing:
            return None
        initial = window.initial_values("loss", 5)
        start = median(initial) if initial else 0.0
        classes = loss_classes(window)
        if classes and classes >= 2 and trained_start(window) is not None:
            # a fine-tune starts near convergence: the level its noise is judged against is chance's
            start = max(start, math.log(classes))
        if start > 0 and level < cfg.min_level_fraction * start:
            return None
        s = window.steps[-1]
        return Finding(
            summary=(f"Loss is oscillating: median step-to-step change {fmt(swing)} vs median loss {fmt(level)} "
                     f"over the last {len(losses)} steps, net progress {fmt(progress)} (step {s.step}, "
                     f"rank {window.rank})"),
            evidence={"step": s.step, "median_swing": swing, "median_loss": level, "progress": progress,
                      "swing_ratio": swing / level},
            step=s.step,
            rank=window.rank,
        )
