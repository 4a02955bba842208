"""Where a rank's parameters sit in a sharded model (FSDP2 ``fully_shard``, HSDP), and their local parts.

Under FSDP2 the parameters (and, after the reduce-scatter, their gradients: what the optimizer sees)
are DTensors whose local tensor is this rank's shard. A quantity measures the local tensors
(``local``): no ``full_tensor()``, no collective in the training step. Sums of squares over them are
this rank's part of the job's value; healthd adds the parts of the ranks of one shard group (the
ranks that together hold one full copy: the shard dimension of the device mesh; under HSDP the
replicate dimension holds equal copies, which must not be added).

FSDP1 (``FullyShardedDataParallel``) keeps plain tensors: with ``use_orig_params=False`` the optimizer
holds one FlatParameter per wrapped unit, a 1-D tensor that is this rank's shard of the unit's
parameters; with ``use_orig_params=True`` the parameters are 1-D views into that shard (some of size 0).
Which ones are shards is read from the model (``FullyShardedDataParallel.fsdp_modules``, public), the
shard group from the unit's process group (under ``HYBRID_SHARD`` the ranks of one replica; the replicas
are not added); ``fsdp1_layout`` gives it, with the ids of those parameters.

What lives here: ``ShardLayout`` (this rank's group, its position in it and the group's size, from
the parameters' device mesh and placements, or FSDP1's process group) and ``local``. What does not:
the measurements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch


def _dtensor_class() -> type | None:
    """DTensor, or None on a torch built without distributed support (nothing can be sharded there)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


_DTENSOR = _dtensor_class()


def is_dtensor(t: torch.Tensor) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own part of ``t``: a DTensor's local tensor (a view, no communication), else ``t``."""
    return cast(torch.Tensor, cast(Any, t).to_local()) if is_dtensor(t) else t


# The most non-finite tensor positions one report lists (healthd.wire.schema.MAX_NONFINITE_TENSORS; the
# client imports nothing from the server, and a test holds the two equal).
MAX_NONFINITE_TENSORS = 4096


def _linear(coords: Sequence[int], sizes: Sequence[int]) -> int:
    index = 0
    for c, n in zip(coords, sizes, strict=True):
        index = index * n + c
    return index


@dataclass(frozen=True)
class ShardLayout:
    """This rank in a sharded model: which shard group (replica), its place in it, the group's size."""

    group: int
    index: int
    count: int
    flat: frozenset[int] = frozenset()  # FSDP1: ids of the parameters that are this rank's flat shards

    def part(self) -> dict[str, Any]:
        """The ``shard`` dict of a StepReport (``healthd.wire.schema.ShardPart``), without values."""
        return {"group": self.group, "index": self.index, "count": self.count}


def shard_layout(params: Iterable[torch.Tensor]) -> ShardLayout | None:
    """The layout of the first parameter sharded over more than one rank; None when none is."""
    for p in params:
        if not is_dtensor(p):
            continue
        mesh, placements = cast(Any, p).device_mesh, cast(Any, p).placements
        coords = mesh.get_coordinate()
        if coords is None:  # this rank is not in the parameter's mesh
            continue
        sizes = list(mesh.shape)
        shard_dims = [d for d, pl in enumerate(placements) if pl.is_shard()]
        other_dims = [d for d in range(len(sizes)) if d not in shard_dims]
        count = math.prod(sizes[d] for d in shard_dims)
        if count < 2:
            continue
        return ShardLayout(group=_linear([coords[d] for d in other_dims], [sizes[d] for d in other_dims]),
                           index=_linear([coords[d] for d in shard_dims], [sizes[d] for d in shard_dims]),
                           count=count)
    return None


def fsdp1_layout(model: torch.nn.Module, params: Iterable[torch.Tensor]) -> ShardLayout | None:
    """The layout of an FSDP1 model whose units shard (not ``NO_SHARD``, which replicates as DDP does);
    None when ``model`` holds no such unit or no parameter of ``params`` is in one."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    units = [u for u in FullyShardedDataParallel.fsdp_modules(model)
             if u.sharding_strategy != ShardingStrategy.NO_SHARD]
    in_units = {id(p) for u in units for p in u.parameters()}
    flat = frozenset(id(p) for p in params if id(p) in in_units)
    if not flat:
        return None
    group = units[0].process_group
    count = torch.distributed.get_world_size(group)
    if count < 2:
        return None
    # HYBRID_SHARD: the unit's process group is the shard group (a device mesh's inner dimension, or the
    # first of the user's (shard, replicate) pair of groups, laid out as the user chose). Shard groups are
    # disjoint, so the lowest global rank in one names it; the replicate coordinate is only known through
    # FSDP1's private ``_inter_node_pg``.
    return ShardLayout(group=min(torch.distributed.get_process_group_ranks(group)),
                       index=torch.distributed.get_rank(group), count=count, flat=flat)


def counted_here(p: torch.Tensor, layout: ShardLayout | None) -> bool:
    """Whether this rank adds parameter ``p`` (or its gradient) into its shard part: a sharded one
    always (its shard), a plain (replicated) one of a sharded model on the group's first rank only, so
    the sum counts it once."""
    return layout is None or is_dtensor(p) or id(p) in layout.flat or layout.index == 0
