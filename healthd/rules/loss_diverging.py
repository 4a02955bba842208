"""LossDiverging: the loss climbs away from the best it reached."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ForSteps,
    Rule,
    WindowedConfig,
    fmt,
    median,
    series,
)
from healthd.state.windows import RankWindow, finite
from healthd.wire.schema import Severity


class LossDivergingConfig(WindowedConfig):
    window_steps: int = Field(default=200, ge=10, description="steps over which the best loss is taken")
    smooth_steps: int = Field(default=5, ge=1, description="losses per median (denoises minibatch loss)")
    warmup_steps: int = Field(default=5, ge=0, description="first steps never judged")
    rise_factor: float = Field(default=1.0, gt=0, description="rise over the best, relative to |best|, that counts")
    progress_fraction: float = Field(
        default=0.5, gt=0, description="rise, as a fraction of the progress made from the start, that counts"
    )
    for_steps: ForSteps = 3


class LossDiverging(Rule[RankWindow, LossDivergingConfig]):
    """The smoothed loss has risen far above the best it reached in the window.

    Why: a diverging loss means the optimisation is unstable (learning rate too
    high, bad data, a broken loss); left alone it ends in NaN or a wasted run.

    Source: "error explodes" / "error goes up" in J. Tobin, "Troubleshooting
    Deep Neural Networks" (Full Stack Deep Learning, 2019); the loss-curve shapes
    of Stanford CS231n notes "Neural Networks Part 3: Learning and Evaluation".
    Thresholds: the median of the last ``smooth_steps``
    losses exceeds the best such median by more than ``rise_factor`` x |best|
    AND by more than ``progress_fraction`` of the progress made since the start
    of the window (both must hold, so late-training noise on a tiny loss does
    not count). Critical once it is above the loss the run started at.
    """

    name: ClassVar[str] = "LossDiverging"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = LossDivergingConfig
    advice: ClassVar[str] = (
        "Lower the learning rate, add gradient clipping and warm-up, and check the data pipeline for a "
        "corrupted shard. Verify the loss's sign and that the optimizer minimises it."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        losses = window.values_from_step("loss", cfg.window_steps, cfg.warmup_steps)
        k = cfg.smooth_steps
        if len(losses) < 3 * k:
            return None
        recent = median(losses[-k:])
        lowest = min(losses)
        if lowest >= 0 and recent <= (1 + cfg.rise_factor) * lowest:
            # Every smoothed value is >= the lowest loss, so the rise over the best smoothed value
            # cannot exceed rise_factor x |best|: the common, healthy case, without the medians.
            return None
        smoothed = _rolling_medians(losses, k)
        best = min(smoothed[:-1])
        start = smoothed[0]
        rise = recent - best
        if rise <= cfg.rise_factor * abs(best):
            return None
        if rise <= cfg.progress_fraction * max(start - best, 0.0):
            return None
        initial = finite(series(window.initial_steps[:k], "loss"))
        initial_level = median(initial) if initial else start
        s = window.steps[-1]
        return Finding(
            summary=(f"Loss is diverging: {fmt(recent)} (median of last {k} steps) vs best {fmt(best)} "
                     f"in the last {len(losses)} steps (rank {window.rank}, step {s.step})"),
            evidence={"step": s.step, "loss_recent": recent, "loss_best": best, "loss_initial": initial_level},
            step=s.step,
            rank=window.rank,
            severity=Severity.CRITICAL if recent > initial_level > 0 else None,
        )


def _rolling_medians(values: Sequence[float], k: int) -> list[float]:
    return [median(values[i:i + k]) for i in range(0, len(values) - k + 1)]
