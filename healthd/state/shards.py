"""Combining the shard-partial measurements of a sharded model (FSDP2, HSDP) across ranks.

Under FSDP a rank holds a shard of each parameter and of its gradient: it can measure sums of squares
over its own shard only (``StepRecord.shard``; measuring the full tensors would need a collective in the
training step). The job's gradient norm is the square root of the sum of those parts over the ranks of a
shard group (the ranks that together hold one full copy of the model: all ranks under FSDP, one replica
under HSDP, whose replicas hold equal values and must not be added); the update ratio likewise is
sqrt(sum ||dw||^2) / sqrt(sum ||w||^2). This is the identity ``torch.nn.utils.clip_grad_norm_`` relies on
for DTensor gradients (an all-reduce of the partial squares over the shard dimension).

Non-finite counts (``nonfinite.grads``, ``nonfinite.params``) count tensors, and a tensor split over the
ranks may hold a NaN in several ranks' shards: they are not added but counted as the union of the tensor
positions the ranks name (``ShardPart.grad_nonfinite``), i.e. the tensors of the full gradient (of the
full parameters) that hold a NaN/Inf, the meaning they have on an unsharded job.

What lives here: holding a sharded job's step records until every rank of their group has reported the
step, then giving them back with ``grad_norm``, ``update_ratio`` and the non-finite counts filled in,
so the store's columns and the rules see the job's value on every rank, as under DDP. What does not:
applying them (the store).

Memory is bounded: at most ``max_pending_steps`` steps wait per job; past that the oldest is given
back incomplete (its combined values None: one rank is missing, and a partial sum would understate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from healthd.wire.records import CLEAN, NonFiniteRecord, StepRecord


def _combined_sqrt(parts: Sequence[float | None]) -> float | None:
    if not parts or any(p is None for p in parts):
        return None
    total = math.fsum(p for p in parts if p is not None)
    return math.sqrt(total) if total >= 0 else math.nan


def combine(parts: Sequence[StepRecord]) -> tuple[float | None, float | None]:
    """(grad_norm, update_ratio) of one step of one shard group, from its ranks' records."""
    shards = [p.shard for p in parts]
    if any(s is None for s in shards):
        return None, None
    grad_norm = _combined_sqrt([s.grad_sq for s in shards if s is not None])
    d = _combined_sqrt([s.update_sq for s in shards if s is not None])
    w = _combined_sqrt([s.weight_sq for s in shards if s is not None])
    if d is None or w is None:
        update_ratio = None
    elif w == 0.0:
        update_ratio = 0.0 if d == 0.0 else math.inf
    else:
        update_ratio = d / w
    return grad_norm, update_ratio


def _union_count(parts: Sequence[list[int] | None]) -> int | None:
    """How many distinct tensors the ranks name; None when some rank did not say (a partial union would
    understate)."""
    if not parts or any(p is None for p in parts):
        return None
    return len({i for p in parts if p is not None for i in p})


def combine_nonfinite(parts: Sequence[StepRecord]) -> tuple[int | None, int | None]:
    """(non-finite gradient tensors, non-finite parameter tensors) of the full model at one step of one
    shard group; None where some rank's part did not list them."""
    shards = [p.shard for p in parts]
    if any(s is None for s in shards):
        return None, None
    return (_union_count([s.grad_nonfinite for s in shards if s is not None]),
            _union_count([s.param_nonfinite for s in shards if s is not None]))


def _with_nonfinite(r: StepRecord, grads: int | None, params: int | None) -> NonFiniteRecord:
    nf = r.nonfinite
    new_grads = nf.grads if grads is None else grads
    new_params = nf.params if params is None else params
    if (new_grads, new_params) == (nf.grads, nf.params):
        return nf
    if not (nf.loss or new_grads or new_params):
        return CLEAN
    return NonFiniteRecord(loss=nf.loss, grads=new_grads, params=new_params)


@dataclass
class ShardCombiner:
    """One sharded job's steps in waiting, keyed by (shard group, step)."""

    max_pending_steps: int = 256
    # rank -> (group, ranks in the group, position in the group), from the rank's last record that said
    layout: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    pending: dict[tuple[int, int], dict[int, StepRecord]] = field(default_factory=dict)  # insertion order

    def sharded(self, s: StepRecord) -> bool:
        """Whether ``s`` goes through the combiner: it has a shard part, or its rank had one before (a
        step that measured nothing sharded must still wait, to keep the rank's steps in order)."""
        return s.shard is not None or s.rank in self.layout

    def add(self, s: StepRecord) -> list[StepRecord]:
        """Take one record; returns the records now complete (possibly none), in the order to apply."""
        if s.shard is not None:
            self.layout[s.rank] = (s.shard.group, s.shard.count, s.shard.index)
        group, count, _ = self.layout[s.rank]
        key = (group, s.step)
        parts = self.pending.setdefault(key, {})
        parts[s.rank] = s
        out: list[StepRecord] = []
        if len(parts) >= count:
            out.extend(self._release(key))
        while len(self.pending) > self.max_pending_steps:
            out.extend(self._release(next(iter(self.pending)), complete=False))
        return out

    def shard_index(self, rank: int) -> int | None:
        """Which shard ``rank`` holds (None: it has not said)."""
        layout = self.layout.get(rank)
        return None if layout is None else layout[2]

    def _release(self, key: tuple[int, int], complete: bool = True) -> list[StepRecord]:
        parts = self.pending.pop(key)
        records = [parts[r] for r in sorted(parts)]
        grad_norm, update_ratio = combine(records) if complete else (None, None)
        bad_grads, bad_params = combine_nonfinite(records) if complete else (None, None)
        layers = _combine_layers(records) if complete else {}
        return [msgspec.structs.replace(
            r,
            grad_norm=grad_norm if r.shard is not None and r.shard.grad_sq is not None else r.grad_norm,
            update_ratio=update_ratio if r.shard is not None and r.shard.update_sq is not None else r.update_ratio,
            nonfinite=_with_nonfinite(r, bad_grads, bad_params),
            layers={name: msgspec.structs.replace(ls, **layers.get(name, {})) for name, ls in r.layers.items()})
            for r in records]


def _combine_layers(records: Sequence[StepRecord]) -> dict[str, dict[str, float | None]]:
    """Per layer, the group's grad_norm and update_ratio from the ranks' layer parts (a layer some rank
    did not report a part of gets none: a partial sum would understate)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in records[0].layers:
        parts = [r.layers.get(name) for r in records]
        if any(p is None for p in parts):
            continue
        present = [p for p in parts if p is not None]
        combined: dict[str, float | None] = {}
        if all(p.grad_sq is not None for p in present):
            combined["grad_norm"] = _combined_sqrt([p.grad_sq for p in present])
        if all(p.update_sq is not None and p.weight_sq is not None for p in present):
            d = _combined_sqrt([p.update_sq for p in present])
            w = _combined_sqrt([p.weight_sq for p in present])
            if d is not None and w is not None:
                combined["update_ratio"] = (0.0 if d == 0.0 else math.inf) if w == 0.0 else d / w
        if combined:
            out[name] = combined
    return out
