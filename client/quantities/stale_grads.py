"""StaleGrads: were gradients already non-zero when the step's backward began? (missing ``zero_grad``)

A gradient hook on each of the optimizer's parameters (``Tensor.register_hook``
runs before the new gradient is accumulated into ``.grad``) looks, at the first
backward after each optimizer step, at the ``.grad`` that is about to be added
to: ``None`` or all zeros is what ``zero_grad`` leaves; anything else is left
over from the previous step. Intended gradient accumulation zeroes after the
optimizer step, so its micro-batches between two steps are never flagged.

The check is a host ``is None`` test and, when a gradient is present, one
``ne(0).any()`` on the device (no host sync). Later hooks in the same backward
return after a bool test.

Writes: ``grads_stale_at_backward`` for each step whose first backward was seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.quantities.base import Quantity, QuantityContext


class StaleGrads(Quantity):
    name = "stale_grads"

    def __init__(self) -> None:
        super().__init__(every_steps=1)  # arming needs every step's post-hook; the check itself is tiny
        self._handles: list[Any] = []
        self._armed = False  # the next backward is the first since an optimizer step
        self._flag: torch.Tensor | bool | None = None

    def on_attach(self, ctx: QuantityContext) -> None:
        for p in ctx.plan.params:
            if p.requires_grad:
                self._handles.append(p.register_hook(self._hook_for(p)))

    def _hook_for(self, p: torch.Tensor) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if not self._armed:
                return
            self._armed = False
            old = p.grad
            self._flag = False if old is None else old.detach().ne(0).any()
        return hook

    def before_step(self, ctx: QuantityContext) -> None:
        if ctx.record is not None and self._flag is not None:
            ctx.record.put(self, "stale", self._flag)
        self._flag = None

    def after_step(self, ctx: QuantityContext) -> None:
        self._armed = True

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        value = values["stale"]
        report["grads_stale_at_backward"] = bool(value[0] if isinstance(value, list) else value)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
