"""LowGPUUtilization: the GPU is idle much of the time while the job trains (and memory is not low)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules._gpu import device_label, last_samples, memory_ratio, percentile, step_of
from healthd.rules.base import Finding, ForSteps, ResolveAfterSteps, Rule, RuleConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import GpuReport, Severity


class LowGPUUtilizationConfig(RuleConfig):
    window_samples: int = Field(default=24, ge=2, description="GPU samples looked at (x gpu_sample_seconds)")
    min_samples: int = Field(default=12, ge=2, description="samples with a utilisation reading needed")
    p95_below_ratio: float = Field(default=0.70, gt=0, le=1, description="p95 utilisation under this warns")
    low_memory_ratio: float = Field(
        default=0.5, gt=0, le=1,
        description="peak memory under this fraction is SmallBatchUnderutilization's case, not this rule's",
    )
    for_steps: ForSteps = 10
    resolve_after_steps: ResolveAfterSteps = 50


def utilization_p95(samples: list[GpuReport]) -> tuple[float, int]:
    """p95 of the utilisation readings (MIG samples carry none) and how many there were."""
    values = [s.utilization_gpu_ratio for s in samples if s.utilization_gpu_ratio is not None]
    return percentile(values, 95), len(values)


def peak_memory_ratio(samples: list[GpuReport]) -> float | None:
    ratios = [r for r in map(memory_ratio, samples) if r is not None]
    return max(ratios) if ratios else None


class LowGPUUtilization(Rule[RankWindow, LowGPUUtilizationConfig]):
    """The 95th percentile of GPU utilisation over the last ``window_samples`` samples is below
    ``p95_below_ratio`` (70%) while the job is stepping: even the busiest moments leave the GPU idle.

    Why: the GPU waits on something else: the input pipeline (too few DataLoader workers, decoding on
    the main process, slow storage), host-side Python between kernels, synchronising calls
    (``.item()``, ``.cpu()``) or communication. Each idle percent is paid-for accelerator time.
    When peak memory is also below ``low_memory_ratio`` the likelier fix is a larger batch:
    SmallBatchUnderutilization fires instead of this rule. MIG slices report no utilisation and are
    never judged.

    Source: SageMaker Debugger's LowGPUUtilization (p95 below 70%). Thresholds:
    ``p95_below_ratio`` 0.70, ``window_samples`` 24, ``min_samples`` 12, ``for_steps`` 10.
    """

    name: ClassVar[str] = "LowGPUUtilization"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = LowGPUUtilizationConfig
    advice: ClassVar[str] = (
        "Profile one step (torch.profiler) to see what the GPU waits on. Usual fixes: more DataLoader workers, "
        "pin_memory=True and non_blocking copies, move preprocessing off the training process, remove "
        ".item()/.cpu() calls from the step, overlap communication (DDP bucket size)."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        if window.latest is None:
            return None
        samples = last_samples(window.gpu, cfg.window_samples)
        p95, n = utilization_p95(samples)
        if n < cfg.min_samples or p95 >= cfg.p95_below_ratio:
            return None
        mem = peak_memory_ratio(samples)
        if mem is not None and mem < cfg.low_memory_ratio:
            return None  # SmallBatchUnderutilization's case
        latest = samples[-1]
        return Finding(
            summary=(f"Rank {window.rank}'s GPU utilisation p95 is {p95:.0%} over the last {n} samples "
                     f"(below {cfg.p95_below_ratio:.0%}) on {device_label(latest)}"),
            evidence={"utilization_p95": p95, "samples": n, "peak_memory_ratio": mem,
                      "gpu": latest.gpu, "uuid": latest.uuid},
            step=step_of(window),
            rank=window.rank,
        )
