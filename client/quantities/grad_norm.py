"""GradNorm: global and per-layer L2 norm of the gradients, and non-finite grads.

Measured in the optimizer's step pre-hook, i.e. on the gradients the optimizer
is about to apply (after any clipping or AMP unscaling the user did before
``optimizer.step()``). ``torch._foreach_norm`` gives each tensor's norm; the
squares are scatter-added into layers on the device; the global norm is the
square root of their sum, so it equals ``torch.nn.utils.clip_grad_norm_``'s
total norm over the optimizer's parameters.

Writes: ``grad_norm``; ``layers[*].grad_norm``; ``layers[*].grad_missing`` (every
parameter of the layer had ``grad is None``); ``nonfinite.grads`` = the number of
parameter TENSORS (not elements) whose gradient holds a NaN or Inf, detected as
a non-finite per-tensor norm (a norm is non-finite iff an element is, barring a
float32 overflow of the norm of a tensor whose elements are all finite, which
needs values near 1e38 and is itself worth reporting).

Sharded models (FSDP2, HSDP; see ``sharding``): the gradients are the local shards of the
DTensor ``.grad`` after the reduce-scatter. Their sum of squares is this rank's part, written as
``shard.grad_sq``; healthd adds the parts of the shard group and fills ``grad_norm`` (a rank alone
cannot know the global norm without a collective). Per-layer parts go in ``layers[*].grad_sq``.
``nonfinite.grads`` is then this rank's own count, and ``shard.grad_nonfinite`` lists which tensors
(positions in the optimizer's order) are non-finite in this rank's shard: healthd counts the union over
the group, the full gradient's non-finite tensors, and replaces the count with it on every rank.

Why it matters: exploding/vanishing gradients and the first NaN are the
earliest signals of a diverging run (Pascanu et al. 2013, "On the difficulty of
training recurrent neural networks").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthd_client.quantities.base import Quantity, QuantityContext, layer_stats
from healthd_client.quantities.reduce import nonfinite_positions, put_layer_norms, safe_sqrt, write_layer_norms
from healthd_client.quantities.sharding import (
    MAX_NONFINITE_TENSORS,
    ShardLayout,
    counted_here,
    local,
)


class GradNorm(Quantity):
    name = "grad_norm"

    def __init__(self, every_steps: int = 1) -> None:
        super().__init__(every_steps)
        self._layout: ShardLayout | None = None

    def on_attach(self, ctx: QuantityContext) -> None:
        self._layout = ctx.plan.layout

    def before_step(self, ctx: QuantityContext) -> None:
        record = ctx.record
        if record is None:
            return
        present: list[tuple[int, Any]] = []
        has_grad = [False] * len(ctx.plan)
        for i, p in enumerate(ctx.plan.params):
            grad = p.grad
            if grad is not None:
                if counted_here(p, self._layout):
                    present.append((i, local(grad)))
                has_grad[ctx.plan.layer_of_param[i]] = True
            elif self._layout is not None and local(p).numel() == 0:
                # FSDP1 (use_orig_params=True): a parameter none of whose elements is in this rank's
                # shard has no gradient here; it is not missing, the other ranks hold it.
                has_grad[ctx.plan.layer_of_param[i]] = True
        record.put(self, "missing", [name for name, seen in zip(ctx.plan.names, has_grad, strict=True) if not seen])
        put_layer_norms(self, record, ctx.plan, present, positions=self._layout is not None)
        record.put(self, "layout", self._layout)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        missing = frozenset(values["missing"])
        for name in missing:
            layer_stats(report, name)["grad_missing"] = True
        layout: ShardLayout | None = values["layout"]
        skip = missing if layout is None else frozenset(values["names"])
        sq = write_layer_norms(report, values, norm_field="grad_norm", nonfinite_field="grads", skip=skip)
        if layout is not None:
            shard = report.setdefault("shard", layout.part())
            shard["grad_sq"] = sum(sq) if sq is not None else 0.0
            shard["grad_nonfinite"] = nonfinite_positions(values, MAX_NONFINITE_TENSORS)
            for name, layer_sq in zip(values["names"], sq or [0.0] * len(values["names"]), strict=True):
                if name not in missing:
                    layer_stats(report, name)["grad_sq"] = layer_sq
        elif sq is not None:
            report["grad_norm"] = safe_sqrt(sum(sq))
