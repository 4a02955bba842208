"""The train_func of the Ray Train test: a small DDP regression, attached to healthd with one line."""

from __future__ import annotations

from typing import Any

import torch

D = 32
BATCH = 64


def train_func(config: dict[str, Any]) -> None:
    import ray.train.torch

    from healthd_client import MonitorConfig
    from healthd_client.integrations import ray_train as healthd_ray

    torch.manual_seed(0)
    w_star = torch.randn(D)
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():  # start near the solution, as in ddp_train.py: a well-behaved healthy run
        model.weight.copy_((w_star + torch.full((D,), D ** -0.5)).unsqueeze(0))
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = healthd_ray.attach(model, opt, server=config["server"],  # the one line
                                 config=MonitorConfig(heartbeat_seconds=0.5, flush_interval_seconds=0.2,
                                                      fingerprint_every_steps=5))
    gen = torch.Generator().manual_seed(1000 + ray.train.get_context().get_world_rank())
    for _ in range(config["steps"]):
        x = torch.randn(BATCH, D, generator=gen)
        loss = 0.5 * (model(x).squeeze(1) - x @ w_star).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss=loss, batch_size=BATCH)
    monitor.close()


def fsdp_train_func(config: dict[str, Any]) -> None:
    """FSDP2 in a Ray Train worker, as Ray's docs recommend for it: the user's own ``fully_shard``
    (``prepare_model(parallel_strategy="fsdp")`` wraps FSDP1 and refuses CPU workers; the refusal's
    message goes to ``config["refused"]``). References as in fsdp_train.py, from full tensors, written
    by rank 0 to ``config["ref"]``."""
    import json
    import math

    import ray.train.torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from healthd_client import MonitorConfig
    from healthd_client.integrations import ray_train as healthd_ray

    def full(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t

    def norm(tensors: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float(full(t).double().square().sum()) for t in tensors))

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 1))
    try:
        ray.train.torch.prepare_model(torch.nn.Linear(2, 2), parallel_strategy="fsdp")
    except RuntimeError as exc:
        if rank == 0:
            with open(config["refused"], "w") as f:
                f.write(str(exc))
    mesh = init_device_mesh("cpu", (ray.train.get_context().get_world_size(),))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = healthd_ray.attach(model, opt, server=config["server"],
                                 config=MonitorConfig(heartbeat_seconds=0.5, flush_interval_seconds=0.2,
                                                      heavy_every_steps=1, fingerprint_every_steps=5))
    gen = torch.Generator().manual_seed(1000 + rank)
    lines = []
    for step in range(config["steps"]):
        x = torch.randn(32, 16, generator=gen)
        loss = (model(x) - x.sum(dim=1, keepdim=True).sin()).square().mean()
        opt.zero_grad()
        loss.backward()
        params = list(model.parameters())
        grad_norm = norm([p.grad for p in params if p.grad is not None])
        layer_grad = {name: norm([p.grad for p in m.parameters() if p.grad is not None])
                      for name, m in model.named_children() if isinstance(m, torch.nn.Linear)}
        before = [full(p.detach()).clone() for p in params]
        opt.step()
        after = [full(p.detach()) for p in params]
        d = math.sqrt(sum(float((a - b).double().square().sum()) for a, b in zip(after, before, strict=True)))
        w = math.sqrt(sum(float(b.double().square().sum()) for b in before))
        lines.append({"step": step, "grad_norm": grad_norm, "update_ratio": d / w, "layer_grad_norm": layer_grad})
        monitor.step(loss=loss, batch_size=32)
    monitor.close()
    if rank == 0:
        with open(config["ref"], "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
