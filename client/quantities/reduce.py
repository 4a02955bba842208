"""Device-side reductions shared by the quantities, all free of host syncs.

The pattern: per-tensor L2 norms with one fused ``torch._foreach_norm`` per
device, squared and scatter-added into a per-layer vector with ``index_add_``.
Each device contributes its partial vector under ``"<name>@<device>"``; the
host adds the partials after unpacking (``sum_partials``), so a model spread
over several devices needs no cross-device traffic in the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from healthd_client.layers import LayerPlan
from healthd_client.quantities.base import layer_stats, nonfinite, pack_dtype


def group_by_device(
    indexed: Iterable[tuple[int, torch.Tensor]],
) -> dict[torch.device, tuple[list[int], list[torch.Tensor]]]:
    """Split (param index, tensor) pairs by the tensor's device, keeping order."""
    groups: dict[torch.device, tuple[list[int], list[torch.Tensor]]] = {}
    for i, t in indexed:
        indices, tensors = groups.setdefault(t.device, ([], []))
        indices.append(i)
        tensors.append(t)
    return groups


def norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms (in float32, float64 if any tensor is), one vector in the pack dtype."""
    tensors = list(tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    out = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.stack(out).to(pack_dtype(out[0].device))


def layer_square_sums(
    plan: LayerPlan,
    device: torch.device,
    param_indices: Sequence[int],
    tensor_norms: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vector over ``plan.layers``: the sum of (weighted) squared norms of each layer's tensors."""
    squares = tensor_norms.square()
    if weights is not None:
        squares = squares * weights
    sums = torch.zeros(len(plan), dtype=tensor_norms.dtype, device=device)
    return sums.index_add_(0, plan.layer_index(device, param_indices), squares)


def count_nonfinite(tensor_norms: torch.Tensor) -> torch.Tensor:
    """How many of the tensors had a NaN/Inf norm (0-d tensor, on the device)."""
    return (~torch.isfinite(tensor_norms)).sum()


def device_key(name: str, device: torch.device) -> str:
    return f"{name}@{device}"


def sum_partials(values: Mapping[str, Any], name: str) -> Any:
    """Add the per-device partials put under ``name@<device>``: floats or lists of floats."""
    total: Any = None
    prefix = f"{name}@"
    for key, value in values.items():
        if not key.startswith(prefix):
            continue
        if total is None:
            total = list(value) if isinstance(value, list) else value
        elif isinstance(value, list):
            total = [a + b for a, b in zip(total, value, strict=True)]
        else:
            total += value
    return total


def safe_sqrt(x: float) -> float:
    """sqrt that keeps NaN/Inf as data (they are findings) instead of raising."""
    return math.sqrt(x) if x >= 0 else math.nan


def ratio(numerator_sq: float, denominator_sq: float) -> float:
    """sqrt(num)/sqrt(den) with 0/0 = 0 (nothing moved) and x/0 = inf."""
    num, den = safe_sqrt(numerator_sq), safe_sqrt(denominator_sq)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def put_layer_norms(quantity: Any, record: Any, plan: LayerPlan,
                    indexed: Iterable[tuple[int, torch.Tensor]], *, positions: bool = False) -> None:
    """Put, per device, the per-layer squared norms (``sq``) and the count of non-finite tensors
    (``nonfinite``) of (param index, tensor) pairs, plus the layer names; ``write_layer_norms`` reads them.
    With ``positions``, also which tensors were non-finite (one flag per tensor, read by
    ``nonfinite_positions``): a sharded model's server needs them to count each tensor once."""
    for device, (indices, tensors) in group_by_device(indexed).items():
        tensor_norms = norms(tensors)
        record.put(quantity, device_key("sq", device), layer_square_sums(plan, device, indices, tensor_norms))
        record.put(quantity, device_key("nonfinite", device), count_nonfinite(tensor_norms))
        if positions:
            record.put(quantity, device_key("bad", device), ~torch.isfinite(tensor_norms))
            record.put(quantity, device_key("at", device), indices)
    record.put(quantity, "names", plan.names)


def nonfinite_positions(values: Mapping[str, Any], limit: int) -> list[int] | None:
    """The param indices whose tensor was non-finite, from what ``put_layer_norms(positions=True)`` put,
    sorted; None when there are more than ``limit`` (the wire's bound)."""
    out: list[int] = []
    for key, flags in values.items():
        if key.startswith("bad@"):
            at = values["at@" + key[len("bad@"):]]
            out.extend(i for i, bad in zip(at, flags, strict=True) if bad)
    return sorted(out) if len(out) <= limit else None


def write_layer_norms(report: dict[str, Any], values: Mapping[str, Any], *, norm_field: str, nonfinite_field: str,
                      skip: frozenset[str] = frozenset()) -> list[float] | None:
    """Write what ``put_layer_norms`` put: the non-finite tensor count and each layer's norm.
    Returns the per-layer squared norms (None when there was no tensor)."""
    nonfinite(report)[nonfinite_field] = int(sum_partials(values, "nonfinite") or 0)
    sq = sum_partials(values, "sq")
    if sq is None:  # no tensor at all (e.g. no parameter had a gradient)
        return None
    for name, layer_sq in zip(values["names"], sq, strict=True):
        if name not in skip:
            layer_stats(report, name)[norm_field] = safe_sqrt(layer_sq)
    return list(sq)
