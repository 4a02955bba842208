"""StragglerRank: a rank persistently slower than the rest of the job."""

from __future__ import annotations

import itertools
import math
import operator
from typing import ClassVar, cast

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ForSteps,
    Hints,
    ResolveAfterSteps,
    Rule,
    WindowedConfig,
    fmt,
    median,
)
from healthd.state.windows import JobWindow, RankStatus, finite
from healthd.wire.schema import Severity


class StragglerRankConfig(WindowedConfig):
    window_steps: int = Field(default=20, ge=3, description="last steps of each rank whose median is compared")
    min_steps: int = Field(default=5, ge=2, description="steps a rank needs in the window to be judged")
    min_score: float = Field(default=0.75, gt=0, lt=1,
                             description="straggler below this score (fastest median / this rank's median)")
    for_steps: ForSteps = Field(default=3, description="consecutive engine ticks with the finding before firing")
    resolve_after_steps: ResolveAfterSteps = Field(default=10, description="ticks without the finding before resolving")


def work_seconds(step_seconds: float | None, comm_seconds: float | None) -> float | None:
    """The rank's own time in a step: step time minus the time spent waiting in gradient all-reduce.

    Under DDP every rank waits for the slowest in the all-reduce, so plain step
    times are all equal; what differs is how much of it each rank spent working.
    """
    if step_seconds is None:
        return None
    if comm_seconds is None:
        return step_seconds
    return max(0.0, step_seconds - comm_seconds)


def _work_times(step_seconds: list[float | None], comm_seconds: list[float | None]) -> list[float]:
    """The finite ``work_seconds`` of aligned step and comm times, the common cases at C speed."""
    if not comm_seconds or (comm_seconds[0] is None and comm_seconds.count(None) == len(comm_seconds)):
        return finite(step_seconds)  # no DDP comm hook: the work is the step time
    try:
        # A None raises TypeError (handled below): past this line both are all numbers.
        work = list(map(operator.sub, cast(list[float], step_seconds), cast(list[float], comm_seconds)))
    except TypeError:  # a None among them ("x in list" compares every float with None: slower)
        return finite([work_seconds(s, c) for s, c in zip(step_seconds, comm_seconds, strict=True)])
    if math.isfinite(sum(work)) and min(work) > 0:  # all finite and positive: max(0.0, w) is w
        return work
    return finite(list(map(max, itertools.repeat(0.0), work)))


class StragglerRank(Rule[JobWindow, StragglerRankConfig]):
    """A rank whose median step work time is well above the fastest rank's.

    Why: synchronous data parallelism runs at the pace of its slowest rank. A
    slow rank (a throttled or degraded GPU, a noisy neighbour, a slow data
    shard or disk, a CPU-bound data loader) costs the whole job its speed, yet
    looks healthy from any single rank's loss curve.

    How: per rank, the median over its last ``window_steps`` steps of its work
    time (``step_seconds - comm_seconds``: time not spent waiting for others in
    DDP's all-reduce, see ``work_seconds``; plain ``step_seconds`` without the
    DDP hook). score = fastest rank's median / this rank's median, as NVIDIA's
    resiliency extension (nvidia-resiliency-ext, straggler detection) scores
    ranks; a rank below ``min_score`` (0.75: 33 % slower) is a straggler. Needs
    two ranks with ``min_steps`` steps each; ranks that closed are ignored.
    """

    name: ClassVar[str] = "StragglerRank"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = StragglerRankConfig
    advice: ClassVar[str] = (
        "Look at this rank's node: GPU clocks and throttling (trainhealth GPU panels, nvidia-smi -q -d PERFORMANCE), "
        "data loading on that host (num_workers, disk, network storage), other processes on the node. Cordon the "
        "node if it is degraded; every other rank waits for this one at each all-reduce."
    )

    hints: ClassVar[Hints] = Hints(summarized=True)

    def rank_summary(self, st: RankStatus) -> tuple[float, int | None] | None:
        """The rank's median work time over its last steps and its last step; None: not judged."""
        if st.closed:
            return None
        n = self.config.window_steps
        times = _work_times(st.column("step_seconds", n), st.column("comm_seconds", n))
        return (median(times), st.last_step) if len(times) >= self.config.min_steps else None

    def evaluate(self, window: JobWindow) -> list[Finding]:
        cfg = self.config
        medians: dict[int, float] = {}
        last_step: dict[int, int | None] = {}
        for rank, summary in window.summaries(self).items():
            if summary is not None:
                medians[rank], last_step[rank] = summary
        if len(medians) < 2:
            return []
        fastest_rank = min(medians, key=lambda r: medians[r])
        fastest = medians[fastest_rank]
        out = []
        for rank, m in sorted(medians.items()):
            if m <= 0:
                continue
            score = fastest / m
            if score < cfg.min_score:
                out.append(Finding(
                    summary=(f"rank {rank} is a straggler: median work time {fmt(m)} s per step vs {fmt(fastest)} s "
                             f"on the fastest rank {fastest_rank} (score {score:.2f} < {cfg.min_score})"),
                    evidence={"score": round(score, 4), "median_work_seconds": m, "fastest_rank": fastest_rank,
                              "fastest_median_work_seconds": fastest, "window_steps": cfg.window_steps},
                    step=last_step[rank], rank=rank,
                ))
        return out
