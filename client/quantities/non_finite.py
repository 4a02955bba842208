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

Sharded models (FSDP2, HSDP): the counts are of this rank's local shards (a tensor is counted on
each rank whose shard of it holds a NaN/Inf); per-layer norms are not written (they would be partial).

Writes: ``nonfinite.params``; ``layers[*].param_norm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthd_client.quantities.base import Quantity, QuantityContext
from healthd_client.quantities.reduce import put_layer_norms, write_layer_norms
from healthd_client.quantities.sharding import local, shard_layout


class NonFiniteParams(Quantity):
    name = "non_finite_params"

    def __init__(self, every_steps: int = 1) -> None:
        super().__init__(every_steps)
        self._sharded = False

    def on_attach(self, ctx: QuantityContext) -> None:
        self._sharded = shard_layout(ctx.plan.params) is not None

    def after_step(self, ctx: QuantityContext) -> None:
        record = ctx.record
        if record is None:
            return
        put_layer_norms(self, record, ctx.plan, ((i, local(p.detach())) for i, p in enumerate(ctx.plan.params)))
        record.put(self, "sharded", self._sharded)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        skip = frozenset(values["names"]) if values["sharded"] else frozenset()
        write_layer_norms(report, values, norm_field="param_norm", nonfinite_field="params", skip=skip)
