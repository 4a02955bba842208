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
    sound_steps,
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
    baseline_percentile: float = Field(
        default=10.0, ge=0, le=50, description="percentile of the earlier smoothed losses taken as the baseline"
    )
    noise_multiple: float = Field(
        default=4.0, ge=0, description="the rise must exceed this many sigma of the loss's step-to-step noise"
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
    losses exceeds a baseline (the ``baseline_percentile``, 10th, percentile of
    the earlier such medians: a robust low level, not the best-ever outlier) by
    more than ``rise_factor`` x |baseline|, by more than ``progress_fraction`` of
    the progress made since the start of the window, AND by more than
    ``noise_multiple`` (4) sigma of the loss's own step-to-step noise (all must
    hold, so minibatch noise on a small, converged loss does not count). Steps
    before the last NaN/Inf are not read. Critical once it is above the loss the
    run started at.

    Not for a stream whose loss training does not drive down (the attach hint ``loss_kind="adversarial"``:
    a GAN's generator or discriminator loss rises whenever the other player improves): not judged.
    """

    name: ClassVar[str] = "LossDiverging"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = LossDivergingConfig
    advice: ClassVar[str] = (
        "Lower the learning rate, add gradient clipping and warm-up, and check the data pipeline for a "
        "corrupted shard. Verify the loss's sign and that the optimizer minimises it."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        if not window.meta.loss_minimized:
            return None  # an adversarial loss (a GAN player's) has no shape to judge
        cfg = self.config
        # Only the steps since the last NaN/Inf: a window straddling one compares two different runs.
        losses = window.values_from_step("loss", sound_steps(window, cfg.window_steps), cfg.warmup_steps)
        k = cfg.smooth_steps
        if len(losses) < 3 * k:
            return None
        recent = median(losses[-k:])
        lowest = min(losses)
        if lowest >= 0 and recent <= (1 + cfg.rise_factor) * lowest:
            # Every smoothed value is >= the lowest loss, so the rise over the baseline cannot
            # exceed rise_factor x |baseline|: the common, healthy case, without the medians.
            return None
        smoothed = _rolling_medians(losses, k)
        # The baseline is a low percentile of the smoothed values that share no loss with the recent
        # median, not their minimum: near convergence the best-ever median of k is an outlier of the
        # minibatch noise, and a run always looks "worse than its best" by that noise.
        earlier = smoothed[:-k]
        best = _percentile(earlier, cfg.baseline_percentile)
        start = smoothed[0]
        rise = recent - best
        if rise <= cfg.rise_factor * abs(best):
            return None
        if rise <= cfg.progress_fraction * max(start - best, 0.0):
            return None
        # The series' own noise: step-to-step changes of iid noise have median ~0.95 sigma.
        swings = [abs(b - a) for a, b in zip(losses[:-k], losses[1:-k], strict=False)]
        noise = median(swings) / 0.95 if swings else 0.0
        if rise <= cfg.noise_multiple * noise:
            return None
        initial = finite(series(window.initial_steps[:k], "loss"))
        initial_level = median(initial) if initial else start
        s = window.steps[-1]
        return Finding(
            summary=(f"Loss is diverging: {fmt(recent)} (median of last {k} steps) vs a baseline of {fmt(best)} "
                     f"(p{cfg.baseline_percentile:g} of the earlier medians over the last {len(losses)} steps; "
                     f"step-to-step noise {fmt(noise)}; rank {window.rank}, step {s.step})"),
            evidence={"step": s.step, "loss_recent": recent, "loss_best": best, "loss_initial": initial_level,
                      "loss_noise": noise},
            step=s.step,
            rank=window.rank,
            severity=Severity.CRITICAL if recent > initial_level > 0 else None,
        )


def _percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank ``pct`` percentile (0-100) of a non-empty series."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(pct / 100 * len(ordered)))]


def _rolling_medians(values: Sequence[float], k: int) -> list[float]:
    return [median(values[i:i + k]) for i in range(0, len(values) - k + 1)]
