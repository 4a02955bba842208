"""NonFiniteParams: parameter tensors holding NaN/Inf after the step, and parameter norms.

The ``nonfinite`` counts of a StepReport count TENSORS, not elements:
``nonfinite.params`` (written here) is the number of parameter tensors with at
least one NaN/Inf element after the optimizer step; ``nonfinite.grads`` (see
``grad_norm``) the same for gradients before it; ``nonfinite.loss`` (see
``loss``) is 1 when the loss is NaN/Inf. A tensor is counted when its L2 norm,
from one fused ``torch._foreach_norm`` in the step post-hook, is non-finite.

Once a parameter is NaN the run is lost: every later step propagates it. The
step at which the first tensor turns non-finite, and which layer, is what the
user needs to find the cause.

The same per-tensor norms give ``layers[*].param_norm`` (the L2 norm of the
layer's parameters after the step) at no extra cost.

Sharded models (FSDP2, HSDP): the count is of this rank's local shards, and ``shard.param_nonfinite``
lists which tensors (positions in the optimizer's order) are non-finite here; healthd counts their union
over the shard group (the full parameters' non-finite tensors) and replaces the count with it on every
rank. Per-layer norms are not written (they would be partial).

Writes: ``nonfinite.params``; ``layers[*].param_norm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthd_client.quantities.base import Quantity, QuantityContext
from healthd_client.quantities.reduce import nonfinite_positions, put_layer_norms, write_layer_norms
from healthd_client.quantities.sharding import MAX_NONFINITE_TENSORS, ShardLayout, local


class NonFiniteParams(Quantity):
    name = "non_finite_params"

    def __init__(self, every_steps: int = 1) -> None:
        super().__init__(every_steps)
        self._layout: ShardLayout | None = None

    def on_attach(self, ctx: QuantityContext) -> None:
        self._layout = ctx.plan.layout

    def after_step(self, ctx: QuantityContext) -> None:
        record = ctx.record
        if record is None:
            return
        put_layer_norms(self, record, ctx.plan, ((i, local(p.detach())) for i, p in enumerate(ctx.plan.params)),
                        positions=self._layout is not None)
        record.put(self, "layout", self._layout)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        layout: ShardLayout | None = values["layout"]
        skip = frozenset(values["names"]) if layout is not None else frozenset()
        write_layer_norms(report, values, norm_field="param_norm", nonfinite_field="params", skip=skip)
        if layout is not None:
            report.setdefault("shard", layout.part())["param_nonfinite"] = nonfinite_positions(
                values, MAX_NONFINITE_TENSORS)
