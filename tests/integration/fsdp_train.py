"""An FSDP2 (``fully_shard``) or HSDP job (gloo, CPU) for the torchrun integration tests; launched by
torchrun, not collected.

The script computes the references itself, outside healthd, from full tensors (``full_tensor()``, a
collective healthd's client never makes): each step's global gradient norm (the gradients the
optimizer is about to apply; per layer too) and update ratio ||w_t - w_{t-1}|| / ||w_{t-1}||. Rank 0 writes them
as JSON lines ``{"step", "grad_norm", "update_ratio"}`` to FSDP_REF.

Environment: HEALTHD_SERVER, HEALTHD_JOB, FSDP_STEPS, FSDP_REF, FSDP_REPLICAS (1: FSDP over all
ranks; 2: HSDP on a (replicas, world / replicas) mesh, replicate x shard), FSDP_FAULT (for the fault
tests: ``nan_batch``: a NaN in rank 1's batch at step FAULT_STEP; ``nan_shard``: a NaN written into
rank 1's local shard of the first layer's weight gradient after backward, at FAULT_STEP; ``lr100``: the
learning rate 100 times the control's; ``frozen``: the middle Linear's parameters ``requires_grad=False``
but still in the optimizer; ``desync``: under HSDP, rank 2 (the second replica's first shard) adds 1e-2 to
its local shard of the first layer's weight after the optimizer step at FAULT_STEP, a divergence between
replicas that nothing repairs).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import healthd_client
from healthd_client import MonitorConfig

D = 16
FAULT_STEP = 10


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def global_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(full(t).double().square().sum()) for t in tensors))


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    replicas = int(os.environ.get("FSDP_REPLICAS", "1"))
    if replicas == 1:
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    fault = os.environ.get("FSDP_FAULT", "")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 1))
    if fault == "frozen":
        model[2].requires_grad_(False)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-1 if fault == "lr100" else 1e-3)
    cfg = MonitorConfig(heartbeat_seconds=0.5, flush_interval_seconds=0.2, heavy_every_steps=1,
                        fingerprint_every_steps=5)
    monitor = healthd_client.attach(model, opt, config=cfg)

    steps = int(os.environ.get("FSDP_STEPS", "30"))
    ref = open(os.environ["FSDP_REF"], "w") if rank == 0 else None  # noqa: SIM115 (closed below)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(steps):
        x = torch.randn(32, D, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()
        if fault == "nan_batch" and step == FAULT_STEP and rank == 1:
            x[0, 0] = math.nan
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        if fault == "nan_shard" and step == FAULT_STEP and rank == 1:
            grad = model[0].weight.grad
            assert isinstance(grad, DTensor)
            grad.to_local().view(-1)[0] = math.nan  # this rank's shard only: rank 0's stays finite
        params = [p for p in model.parameters()]
        grad_norm = global_norm([p.grad for p in params if p.grad is not None])
        layer_grad = {name: global_norm([p.grad for p in m.parameters() if p.grad is not None])
                      for name, m in model.named_children() if isinstance(m, torch.nn.Linear)}
        before = [full(p.detach()).clone() for p in params]
        opt.step()
        if fault == "desync" and step == FAULT_STEP and rank == 2:
            with torch.no_grad():
                weight = model[0].weight
                assert isinstance(weight, DTensor)
                weight.to_local().add_(1e-2)
        after = [full(p.detach()) for p in params]
        d = math.sqrt(sum(float((a - b).double().square().sum()) for a, b in zip(after, before, strict=True)))
        w = math.sqrt(sum(float(b.double().square().sum()) for b in before))
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
