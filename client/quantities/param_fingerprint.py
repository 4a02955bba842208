"""ParamFingerprint: a cheap checksum of the parameters, compared across ranks by RankDesync.

fingerprint = Σ_i a_i · sum(p_i) + b_i · ||p_i||², over the optimizer's
parameter tensors i, in float64, with fixed per-tensor weights a_i, b_i (so a
change that moves mass between tensors, or flips signs, still changes it).
Computed in the optimizer's step post-hook (parameters just updated), every
``every_steps`` steps: the same steps on every rank, so healthd compares like
with like. One fused reduction per device, no host sync; it costs about one
read of the parameters per call.

Only meaningful where parameters are replicated across ranks (DDP); it turns
itself off in a single-process job. Sharded models (FSDP2, HSDP): each rank
fingerprints its local shards, so only ranks holding the same shard (HSDP's
replicas) can be compared; the report's ``shard`` part says which those are. Writes ``param_fingerprint``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.layers import copy_to_device
from healthd_client.quantities.base import Quantity, QuantityContext
from healthd_client.quantities.reduce import device_key, group_by_device, sum_partials
from healthd_client.quantities.sharding import local


def tensor_weights(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic weights per parameter index (the same on every rank and run)."""
    a = torch.tensor([1.0 + ((7 * i) % 11) / 11.0 for i in indices], dtype=torch.float64)
    b = torch.tensor([1.0 + ((5 * i) % 13) / 13.0 for i in indices], dtype=torch.float64)
    return a, b


class ParamFingerprint(Quantity):
    name = "param_fingerprint"

    def __init__(self, every_steps: int = 50) -> None:
        super().__init__(every_steps=every_steps)
        self._weights: dict[torch.device, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}

    def on_attach(self, ctx: QuantityContext) -> None:
        if ctx.identity.world_size < 2:
            self.every_steps = 0

    def after_step(self, ctx: QuantityContext) -> None:
        record = ctx.record
        if record is None:
            return
        for device, (indices, params) in group_by_device(enumerate(ctx.plan.params)).items():
            cached = self._weights.get(device)
            if cached is None or cached[0] != tuple(indices):
                a, b = tensor_weights(indices)
                cached = (tuple(indices), copy_to_device(a, device), copy_to_device(b, device))
                self._weights[device] = cached
            _, a_dev, b_dev = cached
            detached = [local(p.detach()) for p in params]
            sums = torch.stack([p.sum(dtype=torch.float64) for p in detached])
            sq = torch.stack(torch._foreach_norm(detached, 2, dtype=torch.float64)).square()
            record.put(self, device_key("fp", device), (a_dev * sums + b_dev * sq).sum())

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        fp = sum_partials(values, "fp")
        if fp is not None:
            report["param_fingerprint"] = float(fp)

    def memory_overhead_bytes(self) -> int:
        return sum(a.numel() * 16 for _, a, _ in self._weights.values())
