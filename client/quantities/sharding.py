"""Where a rank's parameters sit in a sharded model (FSDP2 ``fully_shard``, HSDP), and their local parts.

Under FSDP2 the parameters (and, after the reduce-scatter, their gradients: what the optimizer sees)
are DTensors whose local tensor is this rank's shard. A quantity measures the local tensors
(``local``): no ``full_tensor()``, no collective in the training step. Sums of squares over them are
this rank's part of the job's value; healthd adds the parts of the ranks of one shard group (the
ranks that together hold one full copy: the shard dimension of the device mesh; under HSDP the
replicate dimension holds equal copies, which must not be added).

What lives here: ``ShardLayout`` (this rank's group, its position in it and the group's size, from
the parameters' device mesh and placements) and ``local``. What does not: the measurements.
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


def counted_here(t: torch.Tensor, layout: ShardLayout | None) -> bool:
    """Whether this rank adds ``t`` into its shard part: a sharded tensor always (its shard), a plain
    (replicated) tensor of a sharded model on the group's first rank only, so the sum counts it once."""
    return layout is None or is_dtensor(t) or layout.index == 0
