"""The fault zoo's DDP cases: 2 ranks under real ``torchrun`` (gloo, CPU), healthy controls and faults.

Each case trains the zoo's digits MLP wrapped in ``DistributedDataParallel``, fed by epochs of a
``DistributedSampler`` with ``drop_last=False`` over a data set whose size is not a multiple of
world size x batch (a short last batch every epoch, and the sampler pads one rank), as an epoch-based
DDP script does. The runner (``bench.faultzoo.runner``) serves a real healthd on a free port and
launches ``torchrun --nproc-per-node 2 -m bench.faultzoo.ddp NAME`` with ``HEALTHD_SERVER`` pointing at
it; this module is also that worker (``main``). The run's seed comes in ``FAULTZOO_SEED``.

Faults: a NaN on one rank, LR x100 under AdamW + clipping + cosine (the healthy twin is a control),
one rank's parameters perturbed (replicas diverge), a missing ``zero_grad``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from bench.faultzoo.scenarios import SEED, digits, mlp, seed

WORLD = 2

@dataclass(frozen=True)
class Ddp:
    """How one case trains; every rank runs the same, except where ``rank`` says otherwise."""

    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw" (GPT-style: betas 0.9/0.95, weight decay 0.1)
    lr: float = 0.05
    epochs: int = 5
    batch: int = 32  # per rank
    train_size: int = 999  # DistributedSampler pads 999 to 1000: 500 per rank, 15 batches of 32 and one of 20
    clip: float | None = None
    warmup_cosine: bool = False  # linear warm-up over 10 steps, then cosine decay to 0 at the last step
    zero_grad: bool = True
    nan_at: int = -1  # rank 1 feeds a NaN input at this step and after
    perturb_at: int = -1  # rank 1 adds noise to its parameters at this step (DDP never re-broadcasts them)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.train_size / WORLD) / self.batch)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

@dataclass(frozen=True)
class DdpScenario:
    """A zoo case run under torchrun: the same fields as ``scenarios.Scenario``, with ``ddp`` for ``setup``."""

    name: str
    expected: str | None
    ddp: Ddp
    onset: int = 0
    fast: bool = False

def train(case: Ddp, monitor_kwargs: dict[str, Any]) -> None:
    """One rank of a case (called under torchrun, after ``init_process_group``)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import healthd_client

    rank = dist.get_rank()
    torch.manual_seed(seed(0))  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = mlp()
    ddp = DistributedDataParallel(model)
    opt: torch.optim.Optimizer
    if case.optimizer == "adamw":
        opt = torch.optim.AdamW(ddp.parameters(), lr=case.lr, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        opt = torch.optim.SGD(ddp.parameters(), lr=case.lr, momentum=0.9)
    sched = None
    if case.warmup_cosine:
        warm, total = 10, case.steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / (total - warm))))
    x, y, _, _ = digits()
    data = TensorDataset(x[:case.train_size], y[:case.train_size])
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        data, shuffle=True, seed=seed(7), drop_last=False)
    loader = DataLoader(data, batch_size=case.batch, sampler=sampler, drop_last=False)
    mon = healthd_client.attach(ddp, opt, num_classes=10, dataset_size=case.train_size, **monitor_kwargs)
    noise = torch.Generator().manual_seed(seed(9))
    step = 0
    for epoch in range(case.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            if rank == 1 and 0 <= case.nan_at <= step:
                xb = xb.clone()
                xb[0, 0] = math.nan
            if case.zero_grad:
                opt.zero_grad()
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()
            if case.clip:
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), case.clip)
            opt.step()
            if sched is not None:
                sched.step()
            if rank == 1 and step == case.perturb_at:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-2 * torch.randn(p.shape, generator=noise))
            mon.step(loss=loss.detach(), batch_size=len(xb))
            step += 1
    mon.close()

_GPT = Ddp(optimizer="adamw", lr=3e-3, batch=64, train_size=1399, epochs=9, clip=1.0, warmup_cosine=True)

DDP_SCENARIOS: tuple[DdpScenario, ...] = (
    DdpScenario("ddp_nan_one_rank", "NonFiniteValues", Ddp(epochs=3, nan_at=30), onset=30),
    DdpScenario("ddp_lr_x100_adamw_clip", "LearningRateTooHigh", replace(_GPT, lr=3e-1)),
    DdpScenario("ddp_desync_rank", "RankDesync", Ddp(perturb_at=20), onset=20),
    DdpScenario("ddp_missing_zero_grad", "MissingZeroGrad", Ddp(epochs=3, zero_grad=False)),
    DdpScenario("ctrl_ddp_uneven_last_batch", None, Ddp()),
    DdpScenario("ctrl_ddp_adamw_clip_cosine", None, _GPT),
)

def main(argv: list[str]) -> None:
    """The torchrun worker: ``python -m bench.faultzoo.ddp NAME`` on every rank."""
    import torch.distributed as dist

    from healthd_client import MonitorConfig

    (name,) = argv
    case = {s.name: s for s in DDP_SCENARIOS}[name].ddp
    SEED.set(int(os.environ.get("FAULTZOO_SEED", "0")))
    torch.set_num_threads(1)

    dist.init_process_group("gloo")
    try:
        # As the in-process zoo: batches of 10 reports, whatever the machine's speed (runner._run_one).
        config = MonitorConfig(flush_interval_seconds=60.0, max_batch_reports=10, heartbeat_seconds=60.0)
        train(case, {"config": config, "strict": True})
    finally:
        dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1:])
