"""LossScale: AMP GradScaler's scale and whether the optimizer step was skipped, without a host sync.

``GradScaler.get_scale()`` calls ``.item()`` (a sync); this quantity puts the
scaler's scale tensor into the step record instead, so it is copied with the
rest of the record. A skipped step is a host fact: ``GradScaler.step`` does
not call ``optimizer.step()`` when it found inf/NaN gradients, so the
optimizer's pre-hook did not run in a step that ``monitor.step`` closes.

Use: ``attach(model, opt, extra_quantities=[LossScale(scaler)])``; call
``monitor.step`` after ``scaler.update()``. Writes ``loss_scale`` (the scale
after the update) and ``step_skipped``. Feeds LossScaleCollapse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthd_client.quantities.base import Quantity, QuantityContext, StepRecord


class LossScale(Quantity):
    name = "loss_scale"

    def __init__(self, scaler: Any) -> None:
        super().__init__(every_steps=1)
        if not hasattr(scaler, "is_enabled") or not hasattr(scaler, "update"):
            raise ValueError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self.scaler = scaler
        self._stepped: int | None = None

    def before_step(self, ctx: QuantityContext) -> None:
        self._stepped = ctx.step

    def on_step_end(self, ctx: QuantityContext, record: StepRecord) -> None:
        if not self.scaler.is_enabled():
            return
        record.put(self, "skipped", self._stepped != record.step)
        scale = getattr(self.scaler, "_scale", None)  # None before the first scaler.scale()
        if scale is not None:
            record.put(self, "scale", scale)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        if "skipped" in values:
            report["step_skipped"] = bool(values["skipped"])
        if "scale" in values:
            scale = values["scale"]
            report["loss_scale"] = float(scale[0] if isinstance(scale, list) else scale)
