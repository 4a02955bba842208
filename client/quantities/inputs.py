"""Inputs: mean, std and max |x| of the model's first floating-point input, sampled.

A forward pre-hook on the (unwrapped) root module (a ``ForwardTap``: a global
hook registered only for sampled steps, never on the user's module; under
``torch.compile`` a hook on the compiled wrapper) reads the first floating
tensor among the call's positional arguments (a global pre-hook sees no keyword
arguments; under ``torch.compile`` keyword arguments are read too) at the first
training forward (grad enabled) of every ``sample_every_steps``-th step; all
elements of the batch together. Integer inputs (token ids) are not measured.
On the device; no host sync.

Only data counts: an input with a ``grad_fn`` was computed by another
differentiable model in the same step (a GAN discriminator's fake pass gets the
generator's tanh output), so that forward is passed over and the tap waits for
the step's next forward whose input is a leaf (the loader's batch). Known limit:
an output detached from its producer (``fake.detach()``) is a leaf too; a
loop that feeds it before the real batch is measured on it.

Writes: ``inputs = {mean, std, abs_max}`` (healthd's InputNotNormalized).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.layers import unwrap_model
from healthd_client.quantities.base import Quantity, QuantityContext, inspection_due
from healthd_client.quantities.forward_tap import ForwardTap


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
        self._tap = ForwardTap(pre=self._hook)
        self._stats: torch.Tensor | None = None

    def _blind(self, ctx: QuantityContext) -> bool:
        reason = self._tap.blind(ctx.compiled_step, layers=False)
        if reason is not None:
            ctx.degrade(self, reason)
        return reason is not None

    def on_attach(self, ctx: QuantityContext) -> None:
        self._tap.watch_root(ctx.model)
        self._tap.watch(unwrap_model(ctx.model), "root")
        if not self._blind(ctx) and inspection_due(0, self.sample_every_steps, self.first_steps):
            self._tap.arm()  # step 0 is sampled

    def _hook(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._stats is not None or not torch.is_grad_enabled():
            return
        x = _first_float(args, kwargs or {})
        if x is not None and x.grad_fn is None:
            with torch.no_grad():
                x = x.detach().float()
                self._stats = torch.stack([x.mean(), x.std(), x.abs().max()])

    def before_step(self, ctx: QuantityContext) -> None:
        if ctx.record is not None and self._stats is not None:
            ctx.record.put(self, "stats", self._stats)
        self._stats = None
        self._tap.disarm()

    def after_step(self, ctx: QuantityContext) -> None:
        if self._blind(ctx):
            return
        if ctx.step is not None and inspection_due(ctx.step + 1, self.sample_every_steps, self.first_steps):
            self._tap.arm()

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        mean, std, abs_max = (float(v) for v in values["stats"])
        if all(math.isfinite(v) for v in (mean, std, abs_max)):
            report["inputs"] = {"mean": mean, "std": std, "abs_max": abs_max}

    def close(self) -> None:
        self._tap.disarm()
