"""LearningRateNotScaled: the batch size changed and the learning rate did not follow."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Rule, WindowedConfig, fmt, median
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity

# Off-level steps a level's run reaches over: an epoch's short last batch, a burst of short sequences.
_MAX_GAP_STEPS = 2


class LearningRateNotScaledConfig(WindowedConfig):
    window_steps: int = Field(default=100, ge=4, description="steps searched for a batch-size change")
    persist_steps: int = Field(default=3, ge=1, description="steps the new batch size must persist "
                               "(a short last batch of an epoch is not a change)")
    varying_persist_steps: int = Field(default=20, ge=1, description="steps the new batch size must persist when "
                                       "sizes vary step to step (e.g. token counts)")
    batch_change_factor: float = Field(default=2.0, gt=1, description="batch-size ratio that counts as a change")
    tolerance_factor: float = Field(default=1.5, gt=1, description="slack around the sqrt..linear scaling band")


class LearningRateNotScaled(Rule[RankWindow, LearningRateNotScaledConfig]):
    """The global batch changed by ``batch_change_factor`` or more and stayed, but the learning rate did not scale.

    Why: the gradient's noise and magnitude per update depend on the batch; after
    going from 256 to 1024 examples per step (e.g. more workers) with the same
    learning rate, each epoch makes 4x fewer updates of the same size and
    training is slower and generalises differently.
    Source: Goyal et al. 2017 (linear scaling rule: multiply the LR by k when the
    batch grows k-fold, with warm-up); the square-root rule (Krizhevsky 2014,
    common with Adam) is accepted too. Thresholds: batch ratio k >= 2 persisting
    ``persist_steps`` (3) as a new level (a one-step dip such as an epoch's
    short last batch, or an uneven shard's remainder, is not a change; where
    the sizes vary step to step, e.g. token counts, the new level must hold
    ``varying_persist_steps``, 20); the LR ratio must lie within [sqrt(k), k] widened by
    ``tolerance_factor`` (1.5x) on each side.
    """

    name: ClassVar[str] = "LearningRateNotScaled"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = LearningRateNotScaledConfig
    advice: ClassVar[str] = (
        "Scale the learning rate with the global batch: linearly for SGD (Goyal et al. 2017, with a few epochs "
        "of warm-up), by sqrt(k) for Adam-style optimizers; or keep the global batch fixed when adding workers."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        sizes_col = [b for b in window.column("batch_size", cfg.window_steps) if b]
        if not sizes_col or min(sizes_col) == max(sizes_col):
            return None  # the batch size did not change in the window: the common case, from one column
        steps = [s for s in window.last(cfg.window_steps) if s.batch_size and s.lr]
        p = cfg.persist_steps
        if len(steps) < p + 1:
            return None
        ws = window.meta.world_size
        sizes = [float(s.batch_size or 0) for s in steps]
        # A change is a sustained new level, not a one-step dip: the new level is the median of the
        # last persist_steps sizes, and the run of steps nearer to it than to the window's first level
        # reaches back over up to _MAX_GAP_STEPS off-level steps (the short last batch of an epoch, an uneven
        # shard's remainder).
        new_batch = median(sizes[-p:])
        first_level = median(sizes[:max(p, len(sizes) // 4)])
        if new_batch <= 0 or first_level <= 0:
            return None
        at_level = [abs(math.log(b / new_batch)) < abs(math.log(b / first_level)) for b in sizes]
        start, gap = len(sizes), 0
        for j in range(len(sizes) - 1, -1, -1):
            if at_level[j]:
                start, gap = j, 0
            else:
                gap += 1
                if gap > _MAX_GAP_STEPS:
                    break
        run = sum(at_level[start:])
        before = sizes[:start]
        if len(before) < p or run < p:
            return None
        old_batch = median(before)
        if old_batch <= 0:
            return None
        k = new_batch / old_batch
        if max(k, 1 / k) < cfg.batch_change_factor:
            return None
        varying = max(_spread(before), _spread(sizes[start:])) > math.sqrt(cfg.batch_change_factor)
        if varying and run < cfg.varying_persist_steps:
            return None  # sizes that vary step to step (token counts): a level needs more steps to show
        i = start - 1
        before_steps = steps[max(0, start - 5):start]
        recent = steps[-p:]
        lr_old = median([s.lr[0] for s in before_steps])
        lr_new = median([s.lr[0] for s in recent])
        if lr_old <= 0 or not math.isfinite(lr_old) or not math.isfinite(lr_new):
            return None
        r = lr_new / lr_old
        lo, hi = sorted((math.sqrt(k), k))
        if lo / cfg.tolerance_factor <= r <= hi * cfg.tolerance_factor:
            return None
        s = steps[-1]
        return Finding(
            summary=(f"Global batch went from {old_batch * ws:g} to {new_batch * ws:g} ({fmt(k)}x) at step "
                     f"{steps[i + 1].step} but the learning rate went {fmt(lr_old)} -> {fmt(lr_new)} ({fmt(r)}x; "
                     f"linear scaling says {fmt(k)}x, sqrt {fmt(math.sqrt(k))}x; rank {window.rank})"),
            evidence={"step": s.step, "change_step": steps[i + 1].step, "batch_before": old_batch * ws,
                      "batch_after": new_batch * ws, "lr_before": lr_old, "lr_after": lr_new, "lr_ratio": r,
                      "batch_ratio": k},
            step=s.step,
            rank=window.rank,
        )


def _spread(sizes: list[float]) -> float:
    """The ratio p80/p20 of positive sizes: 1 for a fixed batch (with a short batch in fewer than 1 in 5
    steps), ~2.3 for token counts uniform in 200..800."""
    ordered = sorted(sizes)
    cut = len(ordered) // 5
    low = ordered[cut]
    return ordered[len(ordered) - 1 - cut] / low if low > 0 else math.inf
