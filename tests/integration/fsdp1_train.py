"""An FSDP1 (``FullyShardedDataParallel``) job (gloo, CPU) for the torchrun integration tests; launched by
torchrun, not collected.

Each Linear is its own FSDP unit (``ModuleWrapPolicy``), the rest in the root unit, at FSDP1's defaults
but for ``device_id`` (CPU needs it) and FSDP1_ORIG_PARAMS (``use_orig_params``, default False: one
FlatParameter per unit). The references come from torch, outside healthd: the global gradient norm from
FSDP1's own ``clip_grad_norm_`` (with an infinite max norm it only measures), the update ratio and (with
``use_orig_params=True``) the per-layer gradient norms from the full parameters and gradients
(``summon_full_params``). Rank 0 writes them as JSON lines to FSDP_REF, as fsdp_train.py does.

FSDP_FAULT=desync: under HSDP, rank 2 (the second replica's first shard) adds 1e-2 to its local part of
the first non-empty parameter after the optimizer step at FAULT_STEP (a divergence between replicas that
nothing repairs), as fsdp_train.py does.

Environment: HEALTHD_SERVER, HEALTHD_JOB, FSDP_STEPS, FSDP_REF, FSDP1_ORIG_PARAMS (0 or 1), FSDP_REPLICAS
(1: FULL_SHARD over all ranks; 2: HSDP, ``ShardingStrategy.HYBRID_SHARD`` on a (replicas, world / replicas)
device mesh, replicate x shard, where FSDP1's ``clip_grad_norm_`` all-reduces over the shard group only),
FSDP1_STRIDED (1: HSDP from a (shard, replicate) pair of process groups whose shard groups are strided,
{0, 2} and {1, 3}, instead of a device mesh's runs of consecutive ranks).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import healthd_client
from healthd_client import MonitorConfig

D = 16
FAULT_STEP = 10


def full_params(model: FSDP, grads: bool = False) -> dict[str, torch.Tensor]:
    with FSDP.summon_full_params(model, with_grads=grads):
        return {name: (p.grad if grads else p).detach().clone() for name, p in model.named_parameters()
                if not grads or p.grad is not None}


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    orig = os.environ.get("FSDP1_ORIG_PARAMS", "0") == "1"
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 1))
    replicas = int(os.environ.get("FSDP_REPLICAS", "1"))
    hybrid: dict[str, object] = {}
    world = dist.get_world_size()
    if replicas > 1 and os.environ.get("FSDP1_STRIDED") == "1":
        # The user's (shard, replicate) pair of groups, laid out across the ranks: shard groups {0, 2} and
        # {1, 3}, replicas {0, 1} and {2, 3} (every rank creates every group, in the same order).
        shard_groups = [dist.new_group(list(range(i, world, replicas))) for i in range(replicas)]
        replica_groups = [dist.new_group(list(range(j * replicas, (j + 1) * replicas)))
                          for j in range(world // replicas)]
        hybrid = {"sharding_strategy": ShardingStrategy.HYBRID_SHARD,
                  "process_group": (shard_groups[rank % replicas], replica_groups[rank // replicas])}
    elif replicas > 1:  # HSDP: shard within a replica, all-reduce across replicas
        hybrid = {"sharding_strategy": ShardingStrategy.HYBRID_SHARD,
                  "device_mesh": init_device_mesh("cpu", (replicas, world // replicas))}
    model = FSDP(inner, device_id=torch.device("cpu"), use_orig_params=orig,
                 auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}), **hybrid)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = MonitorConfig(heartbeat_seconds=0.5, flush_interval_seconds=0.2, heavy_every_steps=1,
                        fingerprint_every_steps=5)
    monitor = healthd_client.attach(model, opt, config=cfg)

    steps = int(os.environ.get("FSDP_STEPS", "30"))
    ref = open(os.environ["FSDP_REF"], "w") if rank == 0 else None  # noqa: SIM115 (closed below)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(steps):
        x = torch.randn(32, D, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        grad_norm = float(model.clip_grad_norm_(math.inf))
        layer_grad: dict[str, float] = {}
        if orig:  # summon_full_params(with_grads=True) needs use_orig_params=True
            grads = full_params(model, grads=True)
            for name in ("0", "2", "4"):
                layer_grad[name] = math.sqrt(sum(float(g.double().square().sum()) for n, g in grads.items()
                                                 if n.replace("_fsdp_wrapped_module.", "").startswith(name + ".")))
        before = full_params(model)
        opt.step()
        if os.environ.get("FSDP_FAULT") == "desync" and step == FAULT_STEP and rank == 2:
            with torch.no_grad():
                next(p for p in model.parameters() if p.numel() > 0).add_(1e-2)
        after = full_params(model)
        d = math.sqrt(sum(float((after[n] - b).double().square().sum()) for n, b in before.items()))
        w = math.sqrt(sum(float(b.double().square().sum()) for b in before.values()))
        if ref is not None:
            ref.write(json.dumps({"step": step, "grad_norm": grad_norm, "update_ratio": d / w,
                                  "layer_grad_norm": layer_grad}) + "\n")
        monitor.step(loss=loss, batch_size=32)
    if ref is not None:
        ref.close()
    monitor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
