"""A Lightning job sharded with FSDP2 (``ModelParallelStrategy``: ``fully_shard`` in ``configure_model``)
on gloo/CPU, with ``HealthdCallback``, for the torchrun integration tests; launched by torchrun (Lightning
reads the torchelastic environment), not collected.

The references come from a second callback, after healthd's, outside healthd: at
``on_before_optimizer_step`` (the gradients the optimizer is about to apply) the global and per-layer
gradient norms from the full gradients (``full_tensor()``, a collective healthd's client never makes)
and a copy of the full parameters; at ``on_train_batch_end`` the update ratio. Rank 0 writes them as
JSON lines to FSDP_REF, in fsdp_train.py's format.

Environment: HEALTHD_SERVER, HEALTHD_JOB, FSDP_STEPS, FSDP_REF.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from healthd_client import MonitorConfig
from healthd_client.integrations.lightning import HealthdCallback

D = 16
LAYERS = ("net.0", "net.2", "net.4")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(full(t).double().square().sum()) for t in tensors))


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8),
                                       torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0]
        return (self.net(x) - x.sum(dim=1, keepdim=True).sin()).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Reference(pl.Callback):
    """The true global values of each step, from full tensors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.line: dict[str, Any] = {}
        self.before: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = list(pl_module.parameters())
        layers = dict(pl_module.named_modules())
        self.line = {"step": trainer.global_step,
                     "grad_norm": norm([p.grad for p in params if p.grad is not None]),
                     "layer_grad_norm": {name: norm([p.grad for p in layers[name].parameters() if p.grad is not None])
                                         for name in LAYERS}}
        self.before = [full(p.detach()).clone() for p in params]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        after = [full(p.detach()) for p in pl_module.parameters()]
        d = math.sqrt(sum(float((a - b).double().square().sum()) for a, b in zip(after, self.before, strict=True)))
        w = math.sqrt(sum(float(b.double().square().sum()) for b in self.before))
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({**self.line, "update_ratio": d / w}) + "\n")


def main() -> None:
    steps = int(os.environ.get("FSDP_STEPS", "30"))
    data = torch.utils.data.TensorDataset(torch.randn(steps * 64, D, generator=torch.Generator().manual_seed(1)))
    cfg = MonitorConfig(heartbeat_seconds=0.5, flush_interval_seconds=0.2, heavy_every_steps=1,
                        fingerprint_every_steps=5)
    # Its defaults give one node's devices to tensor parallelism (data_parallel_size=num_nodes): FSDP over
    # the two ranks needs them on the data-parallel dimension.
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[HealthdCallback(config=cfg), Reference(os.environ["FSDP_REF"])])
    trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=32))


if __name__ == "__main__":
    main()
