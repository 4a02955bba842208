"""GPUMemoryNearLimit: the rank's peak device memory is within a few percent of the device's capacity."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules._gpu import device_label, gib, last_samples, step_of
from healthd.rules.base import Finding, ResolveAfterSteps, Rule, RuleConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class GPUMemoryNearLimitConfig(RuleConfig):
    window_samples: int = Field(default=12, ge=1, description="GPU samples looked at (x gpu_sample_seconds)")
    peak_ratio: float = Field(default=0.95, gt=0, le=1, description="peak used / device total that warns")
    resolve_after_steps: ResolveAfterSteps = 200


class GPUMemoryNearLimit(Rule[RankWindow, GPUMemoryNearLimitConfig]):
    """Peak memory on the rank's GPU is above ``peak_ratio`` (95%) of the device: the next bigger batch,
    longer sequence or fragmentation spike is a CUDA out-of-memory error.

    Why: an OOM kills the job (and with DDP every rank) hours in; seeing the margin shrink first lets
    someone act. Peak is the larger of NVML's used memory over the last ``window_samples`` samples and
    torch's ``max_memory_allocated`` (the allocator's high-water mark, which NVML's periodic view misses).

    Source: PyTorch's CUDA memory management notes (``torch.cuda.max_memory_allocated``); J. Tobin,
    "Troubleshooting Deep Neural Networks" (Full Stack Deep Learning, 2019) on out-of-memory.
    Threshold: ``peak_ratio`` 0.95 of ``memory_total_bytes`` (the MIG slice's on MIG).
    """

    name: ClassVar[str] = "GPUMemoryNearLimit"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = GPUMemoryNearLimitConfig
    advice: ClassVar[str] = (
        "Lower the per-rank batch size (keep the global batch with gradient accumulation), enable activation "
        "checkpointing or mixed precision, free references to tensors kept across steps, or set "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to cut fragmentation."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        samples = [s for s in last_samples(window.gpu, self.config.window_samples) if s.memory_total_bytes]
        if not samples:
            return None
        latest = samples[-1]
        total = latest.memory_total_bytes or 0
        peak = max([s.memory_used_bytes or 0 for s in samples] + [latest.torch_peak_bytes or 0])
        ratio = peak / total
        if ratio < self.config.peak_ratio:
            return None
        return Finding(
            summary=(f"Rank {window.rank}'s peak GPU memory {gib(peak)} is {ratio:.0%} of {gib(total)} on "
                     f"{device_label(latest)}: out-of-memory risk"),
            evidence={"peak_bytes": peak, "total_bytes": total, "peak_ratio": ratio,
                      "torch_peak_bytes": latest.torch_peak_bytes, "gpu": latest.gpu, "uuid": latest.uuid},
            step=step_of(window),
            rank=window.rank,
        )
