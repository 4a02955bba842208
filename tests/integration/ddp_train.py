"""A 2-rank DDP job (gloo, CPU) for the torchrun integration tests; launched by torchrun, not collected.

Linear regression y = x·w* with x ~ N(0, I_d), started at w = w* + δ, |δ|² = 1,
so the gradient noise scale is known in closed form: tr(Σ) = (d + 1)|δ|² and
|G|² = |δ|² (see tests/healthd/test_noise_scale.py, with σ² = 0), hence
B_simple = d + 1 = 33 whatever δ is: it stays put while the model learns.

Environment: HEALTHD_SERVER, HEALTHD_JOB, DDP_STEPS, DDP_WORK_SECONDS (sleep per
step on every rank, a stand-in for compute), DDP_SLOW_RANK / DDP_SLOW_SECONDS
(extra sleep on one rank: a straggler), DDP_DESYNC_AT_STEP (rank 1 nudges a
weight: replicas diverge), DDP_HANG_AT_STEP (rank 1 stops stepping for good,
the process stays alive: rank 0 then blocks in the next all-reduce).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import healthd_client
from healthd_client import MonitorConfig

D = 32
BATCH = 64


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    w_star = torch.randn(D)
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + torch.full((D,), D ** -0.5)).unsqueeze(0))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=float(os.environ.get("DDP_LR", "0.01")))
    cfg = MonitorConfig(heartbeat_seconds=0.5, flush_interval_seconds=0.2, fingerprint_every_steps=5)
    monitor = healthd_client.attach(ddp, opt, config=cfg)

    steps = env_int("DDP_STEPS", 100)
    work = float(os.environ.get("DDP_WORK_SECONDS", "0.01"))
    slow_rank = env_int("DDP_SLOW_RANK", -1)
    slow = float(os.environ.get("DDP_SLOW_SECONDS", "0"))
    desync_at = env_int("DDP_DESYNC_AT_STEP", -1)
    hang_at = env_int("DDP_HANG_AT_STEP", -1)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(steps):
        if rank == 1 and step == hang_at:
            time.sleep(3600)  # a hang: alive, heartbeats go on, no more steps (the test kills the job)
        time.sleep(work + (slow if rank == slow_rank else 0.0))
        x = torch.randn(BATCH, D, generator=gen)
        y = x @ w_star
        loss = 0.5 * (ddp(x).squeeze(1) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 1 and step == desync_at:
            with torch.no_grad():
                model.weight[0, 0] += 1e-3  # only on rank 1: DDP never re-broadcasts parameters
        monitor.step(loss=loss, batch_size=BATCH)
    monitor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
