"""A Lightning job sharded with FSDP2 (``ModelParallelStrategy``: ``fully_shard`` in ``configure_model``)
or FSDP1 (``FSDPStrategy``) on gloo/CPU, with ``HealthdCallback``, for the torchrun integration tests;
launched by torchrun (Lightning reads the torchelastic environment), not collected.

Lightning's ``FSDPStrategy`` refuses a CPU accelerator ("The strategy `fsdp` requires a GPU accelerator"),
and would pass FSDP1 ``device_id=None`` there, which FSDP1 refuses on CPU; ``CPUFSDPStrategy`` is it with
those two CPU refusals lifted (a subclass escapes the accelerator check; its ``_setup_model`` wraps as
Lightning does, with ``device_id`` CPU): what healthd sees is Lightning's layout, the root FSDP unit
wrapping the LightningModule, ``use_orig_params=True``, the optimizer built on the module's parameters.

The references come from a second callback, after healthd's, outside healthd: at
``on_before_optimizer_step`` (the gradients the optimizer is about to apply) the global and per-layer
gradient norms from the full gradients (``full_tensor()``, a collective healthd's client never makes)
and a copy of the full parameters; at ``on_train_batch_end`` the update ratio. Rank 0 writes them as
JSON lines to FSDP_REF, in fsdp_train.py's format.

Environment: HEALTHD_SERVER, HEALTHD_JOB, FSDP_STEPS, FSDP_REF, LIGHTNING_STRATEGY (``model_parallel``,
the default; ``fsdp``: one root unit; ``fsdp_wrap``: each Linear its own unit, the rest in the root).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor

from healthd_client import MonitorConfig
from healthd_client.integrations.lightning import HealthdCallback

D = 16
LAYERS = ("net.0", "net.2", "net.4")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(full(t).double().square().sum()) for t in tensors))


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on CPU (see the module docstring)."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        mixed_precision=self.mixed_precision_config,
                                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                        **self.kwargs)


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8),
                                       torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
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


def full_tensors(trainer: pl.Trainer, pl_module: pl.LightningModule, grads: bool) -> dict[str, torch.Tensor]:
    """The module's full parameters (or gradients) by name, without FSDP1's wrapper prefix."""
    def of(p: torch.Tensor) -> torch.Tensor | None:
        t = p.grad if grads else p
        return None if t is None else full(t.detach()).clone()

    if isinstance(trainer.strategy, ModelParallelStrategy):
        named = {name: of(p) for name, p in pl_module.named_parameters()}
    else:
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, with_grads=grads):
            named = {name.replace("_fsdp_wrapped_module.", ""): of(p) for name, p in pl_module.named_parameters()}
    return {name: t for name, t in named.items() if t is not None}


class Reference(pl.Callback):
    """The true global values of each step, from full tensors."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.line: dict[str, Any] = {}
        self.before: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = full_tensors(trainer, pl_module, grads=True)
        self.line = {"step": trainer.global_step, "grad_norm": norm(list(grads.values())),
                     "layer_grad_norm": {layer: norm([g for name, g in grads.items() if name.startswith(layer + ".")])
                                         for layer in LAYERS}}
        self.before = full_tensors(trainer, pl_module, grads=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        after = full_tensors(trainer, pl_module, grads=False)
        d = math.sqrt(sum(float((after[name] - b).double().square().sum()) for name, b in self.before.items()))
        w = math.sqrt(sum(float(b.double().square().sum()) for b in self.before.values()))
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({**self.line, "update_ratio": d / w}) + "\n")


def main() -> None:
    steps = int(os.environ.get("FSDP_STEPS", "30"))
    data = torch.utils.data.TensorDataset(torch.randn(steps * 64, D, generator=torch.Generator().manual_seed(1)))
    cfg = MonitorConfig(heartbeat_seconds=0.5, flush_interval_seconds=0.2, heavy_every_steps=1,
                        fingerprint_every_steps=5)
    kind = os.environ.get("LIGHTNING_STRATEGY", "model_parallel")
    strategy: pl.strategies.Strategy
    if kind == "model_parallel":
        # Its defaults give one node's devices to tensor parallelism (data_parallel_size=num_nodes): FSDP
        # over the two ranks needs them on the data-parallel dimension.
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    elif kind == "fsdp_wrap":
        strategy = CPUFSDPStrategy(auto_wrap_policy={torch.nn.Linear})
    else:
        strategy = CPUFSDPStrategy()
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[HealthdCallback(config=cfg), Reference(os.environ["FSDP_REF"])])
    trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=32))


if __name__ == "__main__":
    main()
