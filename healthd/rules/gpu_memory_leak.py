"""GPUMemoryLeak: allocated GPU memory keeps rising across the run."""

from __future__ import annotations

import statistics
from typing import ClassVar

from pydantic import Field

from healthd.rules._gpu import device_label, gib, last_samples, step_of
from healthd.rules.base import Finding, ResolveAfterSteps, Rule, RuleConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import GpuReport, Severity


class GPUMemoryLeakConfig(RuleConfig):
    window_samples: int = Field(default=60, ge=4, description="GPU samples looked at (x gpu_sample_seconds)")
    chunks: int = Field(default=4, ge=2, description="the window is cut into this many consecutive chunks")
    increase_points: float = Field(
        default=5.0, gt=0, le=100, description="rise of the moving average, in percentage points of the device"
    )
    resolve_after_steps: ResolveAfterSteps = 100


def _allocated_percent(s: GpuReport) -> float | None:
    if not s.memory_total_bytes:
        return None
    used = s.torch_allocated_bytes if s.torch_allocated_bytes is not None else s.memory_used_bytes
    return None if used is None else 100.0 * used / s.memory_total_bytes


class GPUMemoryLeak(Rule[RankWindow, GPUMemoryLeakConfig]):
    """Allocated GPU memory rises steadily: the mean of every chunk of the window is above the previous
    chunk's, and the last chunk's mean is more than ``increase_points`` (5) percentage points of the
    device above the first chunk's.

    Why: a training step should allocate the same memory every time; a steady rise is a leak (a loss
    or a tensor kept in a Python list, a growing cache, graphs kept alive by ``retain_graph``) that ends
    in an out-of-memory error. Reads torch's ``memory_allocated`` (live tensors), not the allocator's
    reserved pool, which grows and plateaus legitimately; NVML's used memory when torch's is absent.

    Source: SageMaker Debugger's GPUMemoryIncrease rule (moving average up by more than ``increase`` =
    5 percent). Thresholds: ``window_samples`` 60, ``chunks`` 4, ``increase_points`` 5.
    """

    name: ClassVar[str] = "GPUMemoryLeak"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = GPUMemoryLeakConfig
    advice: ClassVar[str] = (
        "Look for tensors kept across steps: accumulate `loss.item()` (or `loss.detach()`), not `loss`; "
        "don't append outputs or hidden states to lists; avoid retain_graph=True; check caches keyed by "
        "input shape. torch.cuda.memory_snapshot() shows what holds the memory."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        samples = last_samples(window.gpu, cfg.window_samples)
        values = [v for v in map(_allocated_percent, samples) if v is not None]
        if len(values) < cfg.window_samples or len(values) < 2 * cfg.chunks:
            return None
        size = len(values) // cfg.chunks
        means = [statistics.fmean(values[i * size:(i + 1) * size]) for i in range(cfg.chunks)]
        rising = all(b > a for a, b in zip(means, means[1:], strict=False))
        increase = means[-1] - means[0]
        if not rising or increase <= cfg.increase_points:
            return None
        latest = samples[-1]
        return Finding(
            summary=(f"Rank {window.rank}'s allocated GPU memory rose {increase:.1f} points of the device "
                     f"({means[0]:.1f}% -> {means[-1]:.1f}%, now {gib(latest.torch_allocated_bytes)}) over "
                     f"{len(values)} samples on {device_label(latest)}"),
            evidence={"first_chunk_percent": means[0], "last_chunk_percent": means[-1],
                      "increase_points": increase, "samples": len(values), "gpu": latest.gpu, "uuid": latest.uuid},
            step=step_of(window),
            rank=window.rank,
        )
