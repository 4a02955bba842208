"""GPUImbalance: GPU utilisation or memory differs widely between the job's ranks."""

from __future__ import annotations

import itertools
import math
import operator
import statistics
from collections.abc import Sequence
from typing import ClassVar, cast

from pydantic import Field

from healthd.rules._gpu import memory_ratio
from healthd.rules.base import Finding, ForSteps, ResolveAfterSteps, Rule, RuleConfig
from healthd.state.windows import JobWindow
from healthd.wire.schema import GpuReport, Severity


class GPUImbalanceConfig(RuleConfig):
    window_samples: int = Field(default=12, ge=1, description="recent GPU samples per rank that are averaged")
    min_samples: int = Field(default=6, ge=1, description="samples a rank needs to be compared")
    utilization_spread: float = Field(default=0.25, gt=0, le=1,
                                      description="max - min of the ranks' mean utilisation that warns (0..1)")
    memory_spread: float = Field(default=0.25, gt=0, le=1,
                                 description="max - min of the ranks' mean memory fraction that warns (0..1)")
    stale_seconds: float = Field(default=120.0, gt=0, description="ranks without a sample for this long are left out")
    for_steps: ForSteps = 3
    resolve_after_steps: ResolveAfterSteps = 10


_utilization = operator.attrgetter("utilization_gpu_ratio")
_used = operator.attrgetter("memory_used_bytes")
_total = operator.attrgetter("memory_total_bytes")


def _present(values: list[float | None]) -> list[float]:
    """The values that are not None."""
    numbers = cast(list[float], values)  # proved below: fsum raises TypeError on a None
    try:
        math.fsum(numbers)
    except TypeError:  # a None ("None in values" compares every float with None: slower)
        return [v for v in values if v is not None]
    return numbers


def _memory_ratios(samples: Sequence[GpuReport]) -> list[float]:
    """``memory_ratio`` of the samples that have one; NVML's readings, the common case, at C speed."""
    total = list(map(_total, samples))
    if all(total):
        try:
            return list(map(operator.truediv, map(_used, samples), total))
        except TypeError:  # no NVML reading in some sample
            pass
    return [r for r in map(memory_ratio, samples) if r is not None]


class GPUImbalance(Rule[JobWindow, GPUImbalanceConfig]):
    """Across the job's live ranks, mean GPU utilisation (or mean memory fraction) over each rank's last
    ``window_samples`` samples spreads by more than ``utilization_spread`` (25 points) or
    ``memory_spread`` (25 points of the device).

    Why: data-parallel ranks do the same work; one that is busier or fuller than the others has more
    data (uneven sharding, variable sequence lengths without bucketing), does extra work (logging,
    evaluation, checkpointing on rank 0) or sits on a slower GPU, and every other rank waits for it at
    each all-reduce. Job-scoped: evaluated on the engine's tick. MIG slices (no utilisation) are
    compared on memory only.

    Source: NVIDIA nvidia-resiliency-ext (straggler detection); PyTorch's DDP notes (every rank waits for
    the slowest at each all-reduce). Thresholds: spreads 0.25,
    ``min_samples`` 6 per rank, ``for_steps`` 3 ticks.
    """

    name: ClassVar[str] = "GPUImbalance"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = GPUImbalanceConfig
    advice: ClassVar[str] = (
        "Compare the ranks named in the alert: balance the data shards (DistributedSampler, drop_last), bucket "
        "by sequence length, move rank-0-only work (logging, eval, checkpoints) off the step path or to all "
        "ranks, and check the odd rank's GPU for throttling."
    )

    def evaluate(self, window: JobWindow) -> Finding | None:
        cfg = self.config
        util: dict[int, float] = {}
        mem: dict[int, float] = {}
        for rank, st in window.ranks.items():
            if st.closed:
                continue
            # Newest first, read from the end of the deque: this runs for every rank of the job on each tick.
            samples = list(itertools.islice(reversed(st.gpu), cfg.window_samples))
            if len(samples) < cfg.min_samples or window.now - samples[0].time > cfg.stale_seconds:
                continue
            u = _present(list(map(_utilization, samples)))
            m = _memory_ratios(samples)
            if len(u) >= cfg.min_samples:
                util[rank] = statistics.fmean(u)
            if len(m) >= cfg.min_samples:
                mem[rank] = statistics.fmean(m)
        parts = []
        evidence: dict[str, float | int | str | bool | None] = {}
        for what, values, limit in (("utilization", util, cfg.utilization_spread),
                                    ("memory", mem, cfg.memory_spread)):
            if len(values) < 2:
                continue
            lo = min(values, key=values.__getitem__)
            hi = max(values, key=values.__getitem__)
            spread = values[hi] - values[lo]
            evidence.update({f"{what}_spread": spread, f"{what}_max_rank": hi, f"{what}_max": values[hi],
                             f"{what}_min_rank": lo, f"{what}_min": values[lo]})
            if spread > limit:
                parts.append(f"{what} {values[lo]:.0%} on rank {lo} vs {values[hi]:.0%} on rank {hi}")
        if not parts:
            return None
        evidence["ranks_compared"] = max(len(util), len(mem))
        return Finding(
            summary=f"GPU load is uneven across ranks of job {window.job}: {'; '.join(parts)}",
            evidence=evidence,
        )
