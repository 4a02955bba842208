"""LossScaleCollapse: the mixed-precision loss scale keeps falling, or steps keep being skipped."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Hints, Rule, WindowedConfig, fmt
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class LossScaleCollapseConfig(WindowedConfig):
    window_steps: int = Field(default=50, ge=2, description="steps looked at")
    max_consecutive_skipped: int = Field(default=5, ge=1, description="skipped steps in a row that count")
    max_skipped_fraction: float = Field(default=0.25, gt=0, le=1,
                                        description="fraction of skipped steps in a full window that counts")
    min_loss_scale: float = Field(default=1.0, gt=0, description="a scale at or below this (and falling) counts")


class LossScaleCollapse(Rule[RankWindow, LossScaleCollapseConfig]):
    """AMP's dynamic loss scale collapses: overflow after overflow, steps skipped again and again.

    Why: ``torch.amp.GradScaler`` halves the scale and skips the optimizer
    step whenever a gradient overflows. An occasional skip is normal; a run of
    skips, or a scale falling towards 1 and below, means the gradients are
    inf/NaN even unscaled (a diverging model, an fp16 overflow in the forward
    pass, a bad batch): the model stops learning while the loop keeps running.

    Thresholds: ``max_consecutive_skipped`` (5) skipped steps in a row, or
    ``max_skipped_fraction`` (25 %) of a full ``window_steps`` (50) window, or
    the scale at or below ``min_loss_scale`` (1.0) after falling. Source:
    mixed-precision training guidance (Micikevicius et al. 2018; PyTorch AMP
    docs); the client reads the scale without a host sync.
    """

    name: ClassVar[str] = "LossScaleCollapse"
    severity: ClassVar[Severity] = Severity.WARNING
    hints: ClassVar[Hints] = Hints(reads=("step_skipped", "loss_scale"))
    Config = LossScaleCollapseConfig
    advice: ClassVar[str] = (
        "Find where the values overflow: run a few steps in fp32 or bf16, check for NaN/Inf in the loss and "
        "activations (NonFiniteValues), lower the learning rate, add gradient clipping after scaler.unscale_(), "
        "and keep softmax / losses in fp32 (autocast does this for its own ops)."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        steps = window.last(cfg.window_steps)
        skipped = [bool(s.step_skipped) for s in steps if s.step_skipped is not None]
        if not skipped and all(s.loss_scale is None for s in steps):
            return None
        run = 0
        for flag in reversed(skipped):
            if not flag:
                break
            run += 1
        fraction = sum(skipped) / len(skipped) if skipped else 0.0
        scales = window.present("loss_scale", len(steps))
        latest = scales[-1] if scales else None
        falling = len(scales) >= 2 and scales[-1] < max(scales)
        reasons = []
        if run >= cfg.max_consecutive_skipped:
            reasons.append(f"{run} steps skipped in a row")
        if len(steps) >= cfg.window_steps and len(skipped) >= cfg.window_steps and fraction >= cfg.max_skipped_fraction:
            reasons.append(f"{fraction:.0%} of the last {len(skipped)} steps skipped")
        if latest is not None and falling and latest <= cfg.min_loss_scale:
            reasons.append(f"loss scale fell to {fmt(latest)} (from {fmt(max(scales))})")
        if not reasons:
            return None
        last = steps[-1]
        return Finding(
            summary="mixed-precision loss scale collapsing: " + "; ".join(reasons),
            evidence={"consecutive_skipped": run, "skipped_fraction": round(fraction, 4), "loss_scale": latest,
                      "max_loss_scale_in_window": max(scales) if scales else None},
            step=last.step,
        )
