"""Inputs: mean, std and max |x| of the model's first floating-point input, sampled.

A forward pre-hook on the (unwrapped) root module reads the first floating
tensor among the call's positional, then keyword, arguments at the first
training forward (grad enabled) of every ``sample_every_steps``-th step; all
elements of the batch together. Integer inputs (token ids) are not measured.
On the device; no host sync.

Writes: ``inputs = {mean, std, abs_max}`` (healthd's InputNotNormalized).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.layers import unwrap_model
from healthd_client.quantities.base import Quantity, QuantityContext, inspection_due


def _first_float(args: Any, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() > 1:
            return a
    return None


class Inputs(Quantity):
    name = "inputs"

    def __init__(self, sample_every_steps: int = 25, first_steps: int = 3) -> None:
        super().__init__(every_steps=1)
        if isinstance(sample_every_steps, bool) or not isinstance(sample_every_steps, int) or sample_every_steps < 1:
            raise ValueError(f"sample_every_steps must be an int >= 1, got {sample_every_steps!r}")
        self.sample_every_steps = sample_every_steps
        self.first_steps = first_steps
        self._handle: Any = None
        self._armed = True
        self._stats: torch.Tensor | None = None

    def on_attach(self, ctx: QuantityContext) -> None:
        self._handle = unwrap_model(ctx.model).register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if not self._armed or self._stats is not None or not torch.is_grad_enabled():
            return
        x = _first_float(args, kwargs or {})
        if x is not None:
            with torch.no_grad():
                x = x.detach().float()
                self._stats = torch.stack([x.mean(), x.std(), x.abs().max()])

    def before_step(self, ctx: QuantityContext) -> None:
        if ctx.record is not None and self._stats is not None:
            ctx.record.put(self, "stats", self._stats)
        self._stats = None
        self._armed = False

    def after_step(self, ctx: QuantityContext) -> None:
        self._armed = ctx.step is not None and inspection_due(ctx.step + 1, self.sample_every_steps,
                                                              self.first_steps)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        mean, std, abs_max = (float(v) for v in values["stats"])
        if all(math.isfinite(v) for v in (mean, std, abs_max)):
            report["inputs"] = {"mean": mean, "std": std, "abs_max": abs_max}

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
