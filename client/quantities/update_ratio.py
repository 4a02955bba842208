"""UpdateRatio: ||w_t - w_{t-1}|| / ||w_{t-1}|| per layer and overall, from the real update.

The ratio of the update to the weights tells a learning rate that is too large
(ratios near 1e-1 and above) or too small (below ~1e-5) for that layer, and a
layer that stopped moving (ratio 0: frozen by accident). Karpathy's "A Recipe
for Training Neural Networks" / CS231n suggest ~1e-3 as a healthy order of
magnitude.

Measured on the REAL update the optimizer made (momentum, Adam's scaling,
weight decay, clipping included), not grad * lr. Copying every parameter would
double the model's memory, so at attach a fixed sample of up to
``update_sample_per_tensor`` elements is chosen per tensor: a strided view of
the flattened tensor with a fixed random offset (a tensor no larger than the
sample is taken whole). The pre-hook copies all samples into preallocated
buffers with one fused ``torch._foreach_copy_`` per device; the post-hook takes
``_foreach_sub`` + ``_foreach_norm`` and scatter-adds the squares into layers.
Each tensor's sampled sums of squares are scaled by ``numel / sampled`` so they
estimate the whole tensor's (without it, a small tensor would weigh as much as
a large one in its layer and in the overall ratio). Both the layer ratios and
the overall ratio are then ``sqrt(sum d^2) / sqrt(sum w^2)`` (exact when every
tensor is sampled whole), with 0/0 reported as 0 (nothing moved) and x/0 as inf.

Tensors larger than the sample whose memory is not dense (expanded views) are
not sampled; layers with no sampled tensor get no ratio. If a parameter's
storage is replaced after attach (``model.to(device)``, ``p.data = ...``), the
samples are rebuilt at the next measured step.

Sharded models (FSDP2, HSDP; see ``sharding``): the samples are taken from each parameter's local
shard, and this rank writes its parts ``shard.update_sq`` and ``shard.weight_sq`` instead of the
ratios; healthd adds the parts of the shard group and fills ``update_ratio``.

Writes: ``update_ratio``; ``layers[*].update_ratio``; or, sharded, ``shard.update_sq``, ``shard.weight_sq``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.layers import LayerPlan, copy_to_device
from healthd_client.quantities.base import Quantity, QuantityContext, layer_stats, pack_dtype
from healthd_client.quantities.reduce import (
    device_key,
    layer_square_sums,
    norms,
    ratio,
    sum_partials,
)
from healthd_client.quantities.sharding import ShardLayout, counted_here, local


def _flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-d view over all elements of ``t`` if its memory is dense (any dim order), else None."""
    if t.dim() == 0:
        return t.view(1)
    strides = t.stride()
    order = sorted(range(t.dim()), key=lambda d: (-strides[d], d))
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def sample_view(t: torch.Tensor, sample_per_tensor: int, rng: random.Random) -> torch.Tensor | None:
    """A view of up to ``sample_per_tensor`` elements of ``t`` (``t`` itself if small enough).

    The view is ``flat[offset::stride][:k]`` with the largest ``stride <= numel // k``
    that is coprime with ``numel``: every row length of a dense tensor divides
    ``numel``, so the sample visits all columns instead of the one or two a
    stride that divides the row length would see (columns of a weight matrix
    share their input's scale, rows their output's).
    """
    n = t.numel()
    if n == 0:
        return None
    if n <= sample_per_tensor:
        return t
    flat = _flat_view(t)
    if flat is None:
        return None
    stride = n // sample_per_tensor
    while math.gcd(stride, n) != 1:
        stride -= 1
    offset = rng.randint(0, n - 1 - (sample_per_tensor - 1) * stride)
    return flat[offset::stride][:sample_per_tensor]


class UpdateRatio(Quantity):
    name = "update_ratio"

    def __init__(self, every_steps: int, sample_per_tensor: int, seed: int = 0) -> None:
        super().__init__(every_steps)
        self._sample_per_tensor = sample_per_tensor
        self._seed = seed
        self._plan: LayerPlan | None = None
        self._ptrs: list[int] = []
        self._groups: dict[torch.device, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        self._weights: dict[torch.device, torch.Tensor] = {}  # numel / sampled, per tensor of a group
        self._sampled_layers: list[str] = []
        self._armed_step: int | None = None
        self._layout: ShardLayout | None = None

    def on_attach(self, ctx: QuantityContext) -> None:
        self._build(ctx.plan)

    def _build(self, plan: LayerPlan) -> None:
        self._plan = plan
        self._layout = plan.layout
        rng = random.Random(self._seed)
        groups: dict[torch.device, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        sampled_layers: set[int] = set()
        for i, p in enumerate(plan.params):
            if not counted_here(p, self._layout):
                continue
            shard = local(p.detach())
            view = sample_view(shard, self._sample_per_tensor, rng)
            if view is None:
                continue
            indices, views, buffers = groups.setdefault(view.device, ([], [], []))
            indices.append(i)
            views.append(view)
            buffers.append(torch.empty(view.shape, dtype=view.dtype, device=view.device))
            sampled_layers.add(plan.layer_of_param[i])
        self._groups = groups
        self._weights = {
            device: copy_to_device(
                torch.tensor([local(plan.params[i].detach()).numel() / v.numel()
                              for i, v in zip(idx, views, strict=True)], dtype=pack_dtype(device)),
                device,
            )
            for device, (idx, views, _) in groups.items()
        }
        self._ptrs = [local(p.detach()).data_ptr() for p in plan.params]
        self._sampled_layers = [plan.names[li] for li in sorted(sampled_layers)]

    def _storage_moved(self, plan: LayerPlan) -> bool:
        return any(local(p.detach()).data_ptr() != ptr for p, ptr in zip(plan.params, self._ptrs, strict=True))

    def before_step(self, ctx: QuantityContext) -> None:
        if self._plan is not ctx.plan or self._storage_moved(ctx.plan):
            self._build(ctx.plan)
        for _, views, buffers in self._groups.values():
            torch._foreach_copy_(buffers, views)
        self._armed_step = ctx.step

    def after_step(self, ctx: QuantityContext) -> None:
        record = ctx.record
        if record is None or self._armed_step != ctx.step:
            return
        self._armed_step = None
        for device, (indices, views, buffers) in self._groups.items():
            deltas = torch._foreach_sub(views, buffers)
            weights = self._weights[device]
            d_sq = layer_square_sums(ctx.plan, device, indices, norms(deltas), weights)
            w_sq = layer_square_sums(ctx.plan, device, indices, norms(buffers), weights)
            record.put(self, device_key("d", device), d_sq)
            record.put(self, device_key("w", device), w_sq)
        record.put(self, "names", ctx.plan.names)
        record.put(self, "sampled", self._sampled_layers)
        record.put(self, "layout", self._layout)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        d, w = sum_partials(values, "d"), sum_partials(values, "w")
        layout: ShardLayout | None = values["layout"]
        if layout is not None:  # this rank's parts; healthd adds the group's (a shard may be empty)
            part = report.setdefault("shard", layout.part())
            part["update_sq"], part["weight_sq"] = (sum(d), sum(w)) if d is not None and w is not None else (0.0, 0.0)
            sampled = set(values["sampled"])
            for name, d_sq, w_sq in zip(values["names"], d or [], w or [], strict=False):
                if name in sampled:
                    layer_stats(report, name).update(update_sq=d_sq, weight_sq=w_sq)
            return
        if d is None or w is None:
            return
        sampled = set(values["sampled"])
        for name, d_sq, w_sq in zip(values["names"], d, w, strict=True):
            if name in sampled:
                layer_stats(report, name)["update_ratio"] = ratio(d_sq, w_sq)
        report["update_ratio"] = ratio(sum(d), sum(w))

    def memory_overhead_bytes(self) -> int:
        buffers = sum(b.numel() * b.element_size() for _, _, bufs in self._groups.values() for b in bufs)
        return buffers + sum(w.numel() * w.element_size() for w in self._weights.values())

    def close(self) -> None:
        self._groups = {}
        self._weights = {}
