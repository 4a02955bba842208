"""A DeepSpeed ZeRO job (gloo, CPU) for the torchrun integration tests; launched by torchrun, not collected.

ZeRO stage DS_STAGE (1, 2 or 3) at DeepSpeed's defaults (no clipping, fp32), the user's torch AdamW passed to
``deepspeed.initialize``. The references come from DeepSpeed, outside healthd: the global gradient norm from
the full gradients (``deepspeed.utils.safe_get_full_grad``, after ``engine.backward``), also checked against
``engine.get_global_grad_norm()``; the update ratio from the full fp32 parameters before and after
``engine.step()`` (``safe_get_full_fp32_param``). Both gather across ranks, which is why they are here and
not in healthd. Rank 0 writes them as JSON lines to DS_REF, as fsdp_train.py does.

DS_FAULT=nan_grad: at FAULT_STEP, a hook on rank 1's hidden activation makes its gradient NaN (the loss stays
finite): every rank's reduced gradient is NaN, DeepSpeed skips the step and reports an infinite norm.

Environment: HEALTHD_SERVER, HEALTHD_JOB, DS_STAGE, DS_STEPS, DS_REF, DS_FAULT; DS_ACCELERATOR=cpu.
"""

from __future__ import annotations

import json
import math
import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

import healthd_client
from healthd_client import MonitorConfig

D = 16
BATCH = 16
FAULT_STEP = 7


def nan_gradient(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
    """Forward hook: the gradient flowing back through ``out`` becomes NaN; the forward value stays finite."""
    out.register_hook(lambda grad: grad * math.nan)


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    stage = int(os.environ["DS_STAGE"])
    fault = os.environ.get("DS_FAULT", "")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 1))
    engine, zero_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                "train_micro_batch_size_per_gpu": BATCH})
    cfg = MonitorConfig(heartbeat_seconds=0.5, flush_interval_seconds=0.2, heavy_every_steps=1,
                        update_sample_per_tensor=1 << 16)  # the whole partition: the ratio is exact
    monitor = healthd_client.attach(engine, zero_opt, config=cfg)

    steps = int(os.environ.get("DS_STEPS", "12"))
    ref = open(os.environ["DS_REF"], "w") if rank == 0 else None  # noqa: SIM115 (closed below)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    params = list(engine.module.parameters())
    for step in range(steps):
        x = torch.randn(BATCH, D, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()
        poison = None
        if fault == "nan_grad" and step == FAULT_STEP and rank == 1:
            poison = engine.module[1].register_forward_hook(nan_gradient)
        loss = (engine(x) - y).square().mean()
        if poison is not None:
            poison.remove()
        engine.backward(loss)
        grads = [safe_get_full_grad(p) for p in params]
        grad_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
        before = [safe_get_full_fp32_param(p).double() for p in params]
        engine.step()
        after = [safe_get_full_fp32_param(p).double() for p in params]
        d = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(after, before, strict=True)))
        w = math.sqrt(sum(float(b.square().sum()) for b in before))
        if ref is not None:
            ds_norm = engine.get_global_grad_norm()
            ref.write(json.dumps({"step": step, "grad_norm": grad_norm, "update_ratio": d / w,
                                  "deepspeed_grad_norm": float(ds_norm)}) + "\n")
        monitor.step(loss=loss, batch_size=BATCH)
    if ref is not None:
        ref.close()
    monitor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
