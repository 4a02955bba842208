"""LossInputs: what sampled loss calls were given (probabilities? log-probabilities? broadcasting shapes?).

On every ``sample_every_steps``-th step a ``torch.overrides.TorchFunctionMode``
is pushed from the previous optimizer step's post-hook (or at attach, for
step 0) and popped in the step's pre-hook, so it sees that step's forward and
loss. Loss modules (``nn.CrossEntropyLoss`` calls ``F.cross_entropy``) and the
functional API both pass through it. Between samples no mode is active, so
other steps pay nothing. Only calls with grad enabled are inspected (not a
validation pass), at most ``max_calls`` per step.

``torch.compile``: dynamo guards on the mode stack, so a mode present while a
compiled frame starts on a sampled step (and absent on the next) recompiles the
model. A ``ForwardTap`` pops the mode while ``torch.compile(model)``'s compiled
forward runs and pushes it back when it returns, so the loss computed after it
(in eager) is still inspected. A loss computed inside a compiled region (a
compiled training-step function) is not seen.

Per call (flags are 0-d device tensors; shapes are host facts):
- ``rows_sum_to_one``: cross_entropy: the input sums to 1 over the class dim
  (dim 1, or 0 unbatched) within 1e-3; nll_loss: its exp does.
- ``all_non_negative`` / ``all_non_positive``: min >= 0 / max <= 0.
- ``broadcasts``: elementwise losses whose input and target shapes differ but
  broadcast (e.g. (N, 1) vs (N,)).

Writes: ``loss_inputs`` (healthd's SoftmaxBeforeLoss, LossInputBroadcast,
InitialLossUnexpected's class count).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from healthd_client.quantities.base import Quantity, QuantityContext, inspection_due
from healthd_client.quantities.forward_tap import ForwardTap

_CLASS_LOSSES = {F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss"}
_ELEMENTWISE_LOSSES = {
    F.mse_loss: "mse_loss", F.l1_loss: "l1_loss", F.smooth_l1_loss: "smooth_l1_loss", F.huber_loss: "huber_loss",
    F.binary_cross_entropy: "binary_cross_entropy",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
}
_ROW_TOLERANCE = 1e-3


def _broadcasts(a: torch.Size, b: torch.Size) -> bool:
    if a == b:
        return False
    try:
        torch.broadcast_shapes(a, b)
    except RuntimeError:
        return False
    return True


def inspect_loss_call(fn: Any, x: torch.Tensor, target: Any) -> tuple[str, dict[str, Any]] | None:
    """(name, values) describing one loss call; flags are device tensors."""
    name = _CLASS_LOSSES.get(fn) or _ELEMENTWISE_LOSSES.get(fn)
    if name is None or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return None
    x = x.detach().float()
    tshape = list(target.shape) if isinstance(target, torch.Tensor) else []
    values: dict[str, Any] = {"fn": name, "input_shape": list(x.shape), "target_shape": tshape}
    flags = [x.min() >= 0, x.max() <= 0]
    if name in ("cross_entropy", "nll_loss"):
        dim = 1 if x.dim() >= 2 else 0
        rows = x.exp().sum(dim) if name == "nll_loss" else x.sum(dim)
        flags.append((rows - 1).abs().max() < _ROW_TOLERANCE)
    else:
        flags.append(torch.zeros((), dtype=torch.bool, device=x.device))
        values["broadcasts"] = isinstance(target, torch.Tensor) and _broadcasts(x.shape, target.shape)
    values["flags"] = torch.stack(flags)
    return name, values


class _LossSpy(TorchFunctionMode):
    def __init__(self, owner: LossInputs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # traced into a graph: inspecting would add ops and guards to it
            return func(*args, **kwargs)
        owner = self.owner
        if (func in _CLASS_LOSSES or func in _ELEMENTWISE_LOSSES) and len(owner.calls) < owner.max_calls \
                and torch.is_grad_enabled():
            x = args[0] if args else kwargs.get("input")
            target = args[1] if len(args) > 1 else kwargs.get("target")
            with torch.no_grad():
                seen = inspect_loss_call(func, x, target)
            if seen is not None:
                owner.calls.append(seen[1])
        return func(*args, **kwargs)


class LossInputs(Quantity):
    name = "loss_inputs"

    def __init__(self, sample_every_steps: int = 25, max_calls: int = 4, first_steps: int = 3) -> None:
        super().__init__(every_steps=1)
        if isinstance(sample_every_steps, bool) or not isinstance(sample_every_steps, int) or sample_every_steps < 1:
            raise ValueError(f"sample_every_steps must be an int >= 1, got {sample_every_steps!r}")
        self.sample_every_steps = sample_every_steps
        self.first_steps = first_steps
        self.max_calls = max_calls
        self.calls: list[dict[str, Any]] = []
        self._mode: _LossSpy | None = None
        self._tap = ForwardTap(compiled_enter=self._pop, compiled_exit=self._push)

    def _push(self) -> None:
        if self._mode is None:
            self._mode = _LossSpy(self)
            self._mode.__enter__()

    def _pop(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            with contextlib.suppress(Exception):  # another thread (atexit) or a user mode pushed on top
                mode.__exit__(None, None, None)

    def _arm(self) -> None:
        if not self._tap.compiled_in_place:  # on the stack when the compiled call starts: guarded, recompiled
            self._push()
        self._tap.arm()

    def _blind(self, ctx: QuantityContext) -> bool:
        reason = self._tap.blind(ctx.compiled_step, layers=False)
        if reason is not None:
            ctx.degrade(self, reason)
        return reason is not None

    def _disarm(self) -> None:
        self._tap.disarm()
        self._pop()

    def on_attach(self, ctx: QuantityContext) -> None:
        self._tap.watch_root(ctx.model)
        if not self._blind(ctx) and inspection_due(0, self.sample_every_steps, self.first_steps):
            self._arm()

    def before_step(self, ctx: QuantityContext) -> None:
        self._disarm()
        if ctx.record is not None:
            for i, call in enumerate(self.calls):
                ctx.record.put(self, f"flags:{i}", call["flags"])
                ctx.record.put(self, f"meta:{i}", {k: v for k, v in call.items() if k != "flags"})
        self.calls = []

    def after_step(self, ctx: QuantityContext) -> None:
        if self._blind(ctx):
            return
        if ctx.step is not None and inspection_due(ctx.step + 1, self.sample_every_steps, self.first_steps):
            self._arm()

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        out = report.setdefault("loss_inputs", [])
        for key in sorted(k for k in values if k.startswith("meta:")):
            meta = dict(values[key])
            non_neg, non_pos, rows = (bool(v > 0.5) for v in values["flags:" + key.split(":", 1)[1]])
            meta.update(all_non_negative=non_neg, all_non_positive=non_pos, rows_sum_to_one=rows)
            out.append(meta)

    def close(self) -> None:
        self._disarm()
