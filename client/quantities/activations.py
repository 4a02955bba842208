"""Activations: dead ReLU units and saturated sigmoid/tanh units, from sampled forward hooks.

Forward hooks (a ``ForwardTap``: global hooks registered only for sampled steps,
never on the user's modules, so ``torch.save``/``deepcopy`` of the model do not
see them) on ``nn.ReLU``/``nn.ReLU6`` (kind ``relu``), ``nn.Sigmoid`` and
``nn.Tanh`` modules (at most ``max_modules``, first in registration order)
measure the first training forward (grad enabled) of every
``sample_every_steps``-th step. Under ``torch.compile`` these modules run
inside the compiled graph and are not measured. The output is viewed as (samples, units): the
last dim for 2-d/3-d outputs (features; time folded into samples), the channel
dim for 4-d+ (channels; positions folded into samples).

- ``dead_fraction``: share of units active (> 0) in < 1% of the samples
  (SageMaker Debugger's dead-ReLU definition).
- ``saturated_fraction``: share of units in the flat region (sigmoid < 0.02 or
  > 0.98; |tanh| > 0.98) in >= 90% of the samples.

All on the device; functional activations (``F.relu`` in forward) are not seen.

Writes: ``activations[module path] = {kind, dead_fraction | saturated_fraction}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.layers import layer_names, sanitize_layer_name
from healthd_client.quantities.base import Quantity, QuantityContext, inspection_due
from healthd_client.quantities.forward_tap import ForwardTap

_KINDS: tuple[tuple[type[torch.nn.Module], str], ...] = (
    (torch.nn.ReLU, "relu"), (torch.nn.ReLU6, "relu"), (torch.nn.Sigmoid, "sigmoid"), (torch.nn.Tanh, "tanh"),
)
DEAD_ACTIVE_SHARE = 0.01
SATURATED_SHARE = 0.9


def _units(y: torch.Tensor) -> torch.Tensor:
    if y.dim() <= 1:
        return y.reshape(-1, 1)
    if y.dim() <= 3:
        return y.reshape(-1, y.shape[-1])
    return y.transpose(1, -1).reshape(-1, y.shape[1])


def unit_stats(kind: str, y: torch.Tensor) -> torch.Tensor:
    """The dead (relu) or saturated (sigmoid/tanh) fraction of units, as a 0-d device tensor."""
    u = _units(y.detach().float())
    if kind == "relu":
        return ((u > 0).float().mean(0) < DEAD_ACTIVE_SHARE).float().mean()
    flat = (u < 0.02) | (u > 0.98) if kind == "sigmoid" else u.abs() > 0.98
    return (flat.float().mean(0) >= SATURATED_SHARE).float().mean()


class Activations(Quantity):
    name = "activations"

    def __init__(self, sample_every_steps: int = 25, max_modules: int = 32, first_steps: int = 3) -> None:
        super().__init__(every_steps=1)  # the post-hook arms the next sampled step; sampling is ours
        if isinstance(sample_every_steps, bool) or not isinstance(sample_every_steps, int) or sample_every_steps < 1:
            raise ValueError(f"sample_every_steps must be an int >= 1, got {sample_every_steps!r}")
        self.sample_every_steps = sample_every_steps
        self.first_steps = first_steps
        self.max_modules = max_modules
        self._kinds: dict[str, str] = {}  # layer name -> kind
        self._tap = ForwardTap(post=self._hook)
        self._seen: dict[str, tuple[str, torch.Tensor]] = {}

    def _blind(self, ctx: QuantityContext) -> bool:
        reason = self._tap.blind(ctx.compiled_step, layers=True)
        if reason is not None:
            ctx.degrade(self, reason)
        return reason is not None

    def on_attach(self, ctx: QuantityContext) -> None:
        self._tap.watch_root(ctx.model)
        if self._blind(ctx):
            return
        for path, module in layer_names(ctx.model):  # peft: readable names, as the step reports'
            kind = next((k for t, k in _KINDS if type(module) is t), None)
            if kind is None:
                continue
            if len(self._kinds) >= self.max_modules:
                break
            name = sanitize_layer_name(path)
            self._kinds[name] = kind
            self._tap.watch(module, name)
        if self._kinds and inspection_due(0, self.sample_every_steps, self.first_steps):
            self._tap.arm()  # step 0 is sampled

    def _hook(self, name: str, output: Any) -> None:
        if name in self._seen or not torch.is_grad_enabled():
            return
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel() > 0:
            kind = self._kinds[name]
            with torch.no_grad():
                self._seen[name] = (kind, unit_stats(kind, output))

    def before_step(self, ctx: QuantityContext) -> None:
        record = ctx.record
        if record is not None and self._seen:
            for name, (kind, value) in self._seen.items():
                record.put(self, f"{kind}:{name}", value)
        self._seen = {}
        self._tap.disarm()

    def after_step(self, ctx: QuantityContext) -> None:
        if self._blind(ctx):
            return
        if self._kinds and ctx.step is not None and inspection_due(ctx.step + 1, self.sample_every_steps,
                                                                   self.first_steps):
            self._tap.arm()

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        out = report.setdefault("activations", {})
        for key, value in values.items():
            kind, name = key.split(":", 1)
            fraction = min(1.0, max(0.0, float(value[0] if isinstance(value, list) else value)))
            field = "dead_fraction" if kind == "relu" else "saturated_fraction"
            out[name] = {"kind": kind, field: fraction}

    def close(self) -> None:
        self._tap.disarm()
