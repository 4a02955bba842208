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
