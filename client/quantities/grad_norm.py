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

Why it matters: exploding/vanishing gradients and the first NaN are the
earliest signals of a diverging run (Pascanu et al. 2013, "On the difficulty of
training recurrent neural networks").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthd_client.quantities.base import Quantity, QuantityContext, layer_stats
from healthd_client.quantities.reduce import put_layer_norms, safe_sqrt, write_layer_norms


class GradNorm(Quantity):
    name = "grad_norm"

    def before_step(self, ctx: QuantityContext) -> None:
        record = ctx.record
        if record is None:
            return
        present: list[tuple[int, Any]] = []
        has_grad = [False] * len(ctx.plan)
        for i, p in enumerate(ctx.plan.params):
            grad = p.grad
            if grad is not None:
                present.append((i, grad))
                has_grad[ctx.plan.layer_of_param[i]] = True
        record.put(self, "missing", [name for name, seen in zip(ctx.plan.names, has_grad, strict=True) if not seen])
        put_layer_norms(self, record, ctx.plan, present)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        missing = frozenset(values["missing"])
        for name in missing:
            layer_stats(report, name)["grad_missing"] = True
        sq = write_layer_norms(report, values, norm_field="grad_norm", nonfinite_field="grads", skip=missing)
        if sq is not None:
            report["grad_norm"] = safe_sqrt(sum(sq))
