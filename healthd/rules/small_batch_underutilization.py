"""SmallBatchUnderutilization: the GPU is underused and its memory mostly empty: the batch is too small."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules._gpu import device_label, last_samples, step_of
from healthd.rules.base import Finding, ForSteps, ResolveAfterSteps, Rule, RuleConfig
from healthd.rules.low_gpu_utilization import peak_memory_ratio, utilization_p95
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class SmallBatchUnderutilizationConfig(RuleConfig):
    window_samples: int = Field(default=24, ge=2, description="GPU samples looked at (x gpu_sample_seconds)")
    min_samples: int = Field(default=12, ge=2, description="samples with a utilisation reading needed")
    p95_below_ratio: float = Field(default=0.70, gt=0, le=1, description="p95 utilisation under this")
    low_memory_ratio: float = Field(default=0.5, gt=0, le=1, description="and peak memory under this fraction")
    for_steps: ForSteps = 10
    resolve_after_steps: ResolveAfterSteps = 50


class SmallBatchUnderutilization(Rule[RankWindow, SmallBatchUnderutilizationConfig]):
    """GPU utilisation p95 is below ``p95_below_ratio`` (70%) AND peak device memory is below
    ``low_memory_ratio`` (50%) over the last ``window_samples`` samples.

    Why: a small batch launches small kernels the GPU finishes before the host queues the next ones,
    and leaves most of the memory unused; a larger batch (with the learning rate scaled, e.g. linearly
    with warm-up) uses the hardware it pays for. Takes precedence over LowGPUUtilization, which stays
    quiet in this case.

    Source: SageMaker Debugger's BatchSize rule (low CPU/GPU utilisation p95 with low memory).
    Thresholds: ``p95_below_ratio`` 0.70, ``low_memory_ratio`` 0.5, ``for_steps`` 10.
    """

    name: ClassVar[str] = "SmallBatchUnderutilization"
    severity: ClassVar[Severity] = Severity.INFO
    Config = SmallBatchUnderutilizationConfig
    advice: ClassVar[str] = (
        "Increase the per-rank batch size until memory is ~80% used (scale the learning rate with it and "
        "re-tune warm-up), or fit more work per step (longer sequences, fewer ranks). If the batch must stay "
        "small, CUDA graphs or torch.compile cut per-kernel launch overhead."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        if window.latest is None:
            return None
        samples = last_samples(window.gpu, cfg.window_samples)
        p95, n = utilization_p95(samples)
        mem = peak_memory_ratio(samples)
        if n < cfg.min_samples or p95 >= cfg.p95_below_ratio or mem is None or mem >= cfg.low_memory_ratio:
            return None
        latest = samples[-1]
        batch = window.latest.batch_size
        return Finding(
            summary=(f"Rank {window.rank}'s GPU is underused (utilisation p95 {p95:.0%}) with at most "
                     f"{mem:.0%} of its memory in use on {device_label(latest)}"
                     + (f"; batch size {batch} looks too small" if batch is not None else "")),
            evidence={"utilization_p95": p95, "peak_memory_ratio": mem, "samples": n, "batch_size": batch,
                      "gpu": latest.gpu, "uuid": latest.uuid},
            step=step_of(window),
            rank=window.rank,
        )
