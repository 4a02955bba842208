"""DeepSpeed ZeRO (stages 1, 2, 3): what ``attach(engine, engine.optimizer)`` measures, and how.

A ``DeepSpeedEngine`` owns its optimizer: ``engine.step()`` runs the ZeRO wrapper's step
(``DeepSpeedZeroOptimizer`` / ``DeepSpeedZeroOptimizer_Stage3``, not a ``torch.optim.Optimizer``), which
computes the global gradient norm, unscales and clips, and then calls the user's torch optimizer once per
parameter group (stage 1/2) or sub-group (stage 3) with its ``param_groups`` swapped for this rank's flat
fp32 partition. The torch optimizer's step hooks therefore fire several times per step when there are
several groups, with the groups of the moment, and not at all when DeepSpeed skips a step whose gradient
norm is not finite: they cannot mark healthd's steps. The module's ``.grad`` is None by then (ZeRO keeps
gradients in flat buffers) and, under ZeRO-3, its parameters are empty placeholders.

So the monitor registers no optimizer hook here (``Monitor(step_hooks=False)``): everything is measured in
``monitor.step()``, which the training loop calls after ``engine.step()`` (a call after a micro-batch that
did not update, under gradient accumulation, is ignored: ``EngineStepped``), from what DeepSpeed keeps:

- ``grad_norm``: ``engine.get_global_grad_norm()``, the norm DeepSpeed computed for its own clipping and
  overflow check (global over all ranks, before clipping; ``inf`` on a step it skipped because a gradient
  was NaN/Inf, which healthd's NonFiniteValues reads). It is a value every rank holds (a replica's, as
  under DDP), read without a collective; a tensor stays on its device until the record is packed.
- ``update_ratio``: this rank's fp32 master partition (stage 1/2: the flat partitions in the torch
  optimizer's ``param_groups``; stage 3: ``deepspeed.utils.safe_get_local_fp32_param`` per parameter, the
  documented local-shard view, cut at the parameter's end: the last ranks' slices are padded with memory
  DeepSpeed never initialises). A sample of it is kept from the previous ``monitor.step()`` (at attach for
  the first), so the update is the real one the optimizer made. Its sums of squares are this rank's parts
  (``shard.update_sq``/``weight_sq``), which healthd adds over the data-parallel ranks, as under FSDP: under
  every stage, ZeRO partitions the optimizer's master weights, so each rank holds a different part.

Not measured at DeepSpeed's defaults (sent as MonitoringDegraded, with the reason): per-layer gradient
norms and update ratios (stage 1/2 master weights are one flat partition per group: layers are lost;
DeepSpeed's per-parameter gradient APIs gather across ranks), non-finite parameter counts (parameters
stay finite: DeepSpeed skips a non-finite step, and ``grad_norm`` says so), the parameter fingerprint
(RankDesync: the ranks' partitions differ by design) and the gradient noise scale (DDP's comm hook).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch

from healthd_client.quantities.base import Quantity, QuantityContext, StepRecord
from healthd_client.quantities.sharding import ShardLayout
from healthd_client.quantities.update_ratio import sample_view

# What the default quantities measure that a ZeRO engine does not let healthd measure: name -> reason.
NOT_MEASURED = {
    "layer_stats": "DeepSpeed ZeRO keeps gradients and fp32 master weights as flat per-rank partitions: "
                   "per-layer grad_norm/update_ratio are not measured (global values are)",
    "non_finite_params": "DeepSpeed ZeRO skips a step whose gradient norm is not finite (grad_norm inf "
                         "reports it), so parameters are not counted for NaN/Inf",
    "param_fingerprint": "DeepSpeed ZeRO ranks hold different partitions by design: RankDesync does not apply",
    "ddp_gradient_noise": "no DDP comm hook under DeepSpeed ZeRO: the gradient noise scale is not measured",
}
# Default quantities that need the optimizer's step hooks (gradients before, parameters after the update).
REPLACED = frozenset({"grad_norm", "update_ratio", "non_finite_params", "param_fingerprint",
                      "stale_grads", "ddp_gradient_noise"})


def deepspeed_engine(model: Any) -> Any | None:
    """``model`` if it is a DeepSpeed engine running ZeRO stage 1-3, else None (stage 0 is plain data
    parallelism over the user's own optimizer: its step hooks work as under DDP)."""
    if not type(model).__module__.startswith("deepspeed.") or not hasattr(model, "zero_optimization_stage"):
        return None
    return model if int(model.zero_optimization_stage()) in (1, 2, 3) else None


@dataclass(frozen=True)
class ZeroJob:
    """A ZeRO engine as healthd sees it: the user's module and torch optimizer, this rank's place."""

    engine: Any
    stage: int
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    layout: ShardLayout


def zero_job(engine: Any, optimizer: Any) -> ZeroJob:
    """Resolve what attach() was given (the engine and its ``engine.optimizer``, or the torch optimizer
    passed to ``deepspeed.initialize``); ``ValueError`` when the optimizer is not this engine's."""
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", None)
    if optimizer is not wrapper and optimizer is not inner:
        raise ValueError("attach(engine, optimizer): under DeepSpeed pass the engine and engine.optimizer "
                         f"(the ZeRO optimizer it runs), got a {type(optimizer).__name__} that is not the engine's")
    if not isinstance(inner, torch.optim.Optimizer):
        raise ValueError(f"DeepSpeed ZeRO's optimizer wraps a {type(inner).__name__}, not a torch.optim.Optimizer: "
                         "pass a torch optimizer to deepspeed.initialize(optimizer=...) or name one in the config")
    group = engine.data_parallel_group
    count = torch.distributed.get_world_size(group)
    if count != torch.distributed.get_world_size():
        raise ValueError("healthd supports DeepSpeed ZeRO with data parallelism over all ranks only "
                         f"(data-parallel size {count}, world size {torch.distributed.get_world_size()})")
    layout = ShardLayout(group=0, index=torch.distributed.get_rank(group), count=count)
    return ZeroJob(engine=engine, stage=int(engine.zero_optimization_stage()), module=engine.module,
                   optimizer=inner, layout=layout)


def master_parts(job: ZeroJob) -> list[torch.Tensor]:
    """This rank's fp32 master weights: views that the optimizer updates in place, step after step."""
    if job.stage == 3:
        from deepspeed.utils import safe_get_local_fp32_param
        parts = []
        for p in job.module.parameters():
            local = safe_get_local_fp32_param(p) if p.requires_grad else None
            if local is None:
                continue
            # Each rank holds an equal slice of the flattened parameter (rank i: [i*n, (i+1)*n)), padded at the
            # end with memory DeepSpeed never writes: only the elements before the parameter's end count.
            held = max(0, min(local.numel(), int(cast(Any, p).ds_numel) - job.layout.index * local.numel()))
            if held > 0:
                parts.append(local.reshape(-1)[:held])
        return parts
    return [p for group in job.optimizer.param_groups for p in group["params"] if p.numel() > 0]


class ZeroGradNorm(Quantity):
    """The global gradient norm DeepSpeed computed in ``engine.step()`` (before clipping)."""

    name = "grad_norm"

    def __init__(self, job: ZeroJob, every_steps: int = 1) -> None:
        super().__init__(every_steps)
        self._engine = job.engine

    def on_step_end(self, ctx: QuantityContext, record: StepRecord) -> None:
        norm = self._engine.get_global_grad_norm()
        if norm is not None:  # None: DeepSpeed was told not to compute it
            record.put(self, "norm", norm if isinstance(norm, torch.Tensor) else float(norm))

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        norm = values["norm"]
        report["grad_norm"] = float(norm[0] if isinstance(norm, list) else norm)


class ZeroUpdateRatio(Quantity):
    """This rank's part of ||w_t - w_{t-1}||² and ||w_{t-1}||² over a sample of its fp32 master partition.

    The sample (up to ``sample_per_tensor`` elements per partition, as ``update_ratio.sample_view``
    chooses; whole when the partition is small) is copied at every ``monitor.step()`` and compared at the
    next measured one: ``every_steps`` > 1 measures the update of that step alone because the copy is
    refreshed at the step before it.
    """

    name = "update_ratio"

    def __init__(self, job: ZeroJob, every_steps: int, sample_per_tensor: int, seed: int = 0) -> None:
        super().__init__(every_steps)
        self._job = job
        self._sample_per_tensor = sample_per_tensor
        self._seed = seed
        self._views: list[torch.Tensor] = []
        self._buffers: list[torch.Tensor] = []
        self._weights = torch.zeros(0)
        self._ptrs: list[int] = []

    def due(self, step: int) -> bool:
        # The copy is taken at the step before a measured one, so this runs then too.
        return self.every_steps > 0 and (step % self.every_steps == 0 or (step + 1) % self.every_steps == 0)

    def on_attach(self, ctx: QuantityContext) -> None:
        self._build()

    def _build(self) -> None:
        rng = random.Random(self._seed)
        parts = master_parts(self._job)
        pairs = [(p, v) for p in parts if (v := sample_view(p.detach(), self._sample_per_tensor, rng)) is not None]
        self._views = [v for _, v in pairs]
        self._buffers = [v.detach().clone() for v in self._views]
        self._weights = torch.tensor([p.numel() / v.numel() for p, v in pairs], dtype=torch.float64)
        self._ptrs = [p.data_ptr() for p in parts]

    def on_step_end(self, ctx: QuantityContext, record: StepRecord) -> None:
        if [p.data_ptr() for p in master_parts(self._job)] != self._ptrs:
            self._build()  # storage replaced (a checkpoint load): nothing to compare this step
            return
        if not self._views:
            return
        if record.step % self.every_steps == 0:
            deltas = torch._foreach_sub(self._views, self._buffers)
            w = self._weights.to(self._views[0].device)
            d_sq = torch.stack(torch._foreach_norm(deltas)).double().square().mul(w).sum()
            w_sq = torch.stack(torch._foreach_norm(self._buffers)).double().square().mul(w).sum()
            record.put(self, "d", d_sq)
            record.put(self, "w", w_sq)
        torch._foreach_copy_(self._buffers, self._views)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        part = report.setdefault("shard", self._job.layout.part())
        part["update_sq"], part["weight_sq"] = float(values["d"]), float(values["w"])

    def memory_overhead_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def close(self) -> None:
        self._views, self._buffers = [], []


class EngineStepped:
    """Whether ``engine.step()`` updated the model since the last call: with gradient accumulation the engine
    is stepped every micro-batch and updates at the boundaries only, where ``engine.global_steps`` counts
    (a step DeepSpeed skipped for a non-finite gradient counts too: healthd reports it, with its norm)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._seen = int(engine.global_steps)

    def __call__(self) -> bool:
        now = int(self._engine.global_steps)
        stepped, self._seen = now != self._seen, now
        return stepped


def zero_quantities(job: ZeroJob, defaults: list[Quantity], update_every_steps: int,
                    sample_per_tensor: int) -> list[Quantity]:
    """The default quantities with those that need optimizer step hooks replaced by ZeRO's own."""
    kept = [q for q in defaults if q.name not in REPLACED]
    return [*kept, ZeroGradNorm(job),
            ZeroUpdateRatio(job, every_steps=update_every_steps, sample_per_tensor=sample_per_tensor)]


__all__ = ["NOT_MEASURED", "EngineStepped", "ZeroGradNorm", "ZeroJob", "ZeroUpdateRatio", "deepspeed_engine",
           "zero_job", "zero_quantities"]
