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
    window_steps: int = Field(default=40, ge=3, description="last steps of each rank that are compared")
    min_steps: int = Field(default=5, ge=2, description="steps a rank needs in the window to be judged")
    min_score: float = Field(default=0.75, gt=0, lt=1,
                             description="straggler below this score (fastest median / this rank's median)")
    sustained_steps: int = Field(default=30, ge=2,
                                 description="steps of the rank in the window before a finding can be a warning")
    blocks: int = Field(default=4, ge=1, description=(
        "the window is cut into this many runs of consecutive steps; a warning needs the rank slower in "
        "every one (score below the midpoint of min_score and 1: a stable ratio, not a burst)"))
    noise_multiple: float = Field(default=1.0, ge=0, description=(
        "a warning needs the gap between medians above this many times the fastest rank's step-to-step "
        "noise (median absolute difference of consecutive work times)"))
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


def step_to_step_noise(values: list[float]) -> float:
    """Median absolute difference of consecutive values: a rank's own jitter, blind to slow trends."""
    return median([abs(b - a) for a, b in itertools.pairwise(values)]) if len(values) > 1 else 0.0


def blocks_of(values: list[float], k: int) -> list[list[float]]:
    """``values`` cut into ``k`` runs of consecutive values of near-equal length (fewer when short)."""
    k = max(1, min(k, len(values)))
    q, r = divmod(len(values), k)
    bounds = [i * q + min(i, r) for i in range(k + 1)]
    return [values[a:b] for a, b in itertools.pairwise(bounds)]


class StragglerRank(Rule[JobWindow, StragglerRankConfig]):
    """A rank whose step work time is well and persistently above the fastest rank's.

    Why: synchronous data parallelism runs at the pace of its slowest rank. A
    slow rank (a throttled or degraded GPU, a noisy neighbour, a slow data
    shard or disk, a CPU-bound data loader) costs the whole job its speed, yet
    looks healthy from any single rank's loss curve.

    How: per rank, its work times over its last ``window_steps`` steps
    (``step_seconds - comm_seconds``: time not spent waiting for others in
    DDP's all-reduce, see ``work_seconds``; plain ``step_seconds`` without the
    DDP hook). Under DDP every rank waits in the gradient all-reduce, so a slow
    rank shows as a larger share of work, not as a longer step. score = fastest
    rank's median / this rank's median, as NVIDIA's resiliency extension
    (nvidia-resiliency-ext, straggler detection) scores ranks; a rank below
    ``min_score`` (0.75: 33 % slower) is a candidate. Needs two ranks with
    ``min_steps`` steps each; ranks that closed are ignored.

    A candidate is a warning only with the evidence a page needs: sustained,
    the rank has ``sustained_steps`` (30) steps in the window; a stable ratio,
    the window cut into ``blocks`` (4) runs of consecutive steps, the score
    against the fastest rank's same run is below the midpoint of ``min_score``
    and 1 (0.875: clearly slower, with room for a short run's jitter) in every one (a
    slow node is slow throughout, a burst of starvation moves only some runs,
    though it can move the whole window's median); larger than the job's own
    noise, the gap between the medians exceeds ``noise_multiple`` (1) times the
    fastest rank's step-to-step noise (median absolute difference of
    consecutive work times); consistent on the same rank, the engine needs the
    finding on that rank for ``for_steps`` ticks in a row. Without that evidence
    it is info: on a shared or oversubscribed host a worker starved for a few
    seconds looks like a straggler for a while, and that is the host's noise,
    not a degraded node.
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

    def rank_summary(self, st: RankStatus) -> tuple[float, int | None, list[float]] | None:
        """The rank's median work time over its last steps, its last step and those work times; None: not judged."""
        if st.closed:
            return None
        n = self.config.window_steps
        times = _work_times(st.column("step_seconds", n), st.column("comm_seconds", n))
        return (median(times), st.last_step, times) if len(times) >= self.config.min_steps else None

    def evaluate(self, window: JobWindow) -> list[Finding]:
        cfg = self.config
        medians: dict[int, float] = {}
        last_step: dict[int, int | None] = {}
        times: dict[int, list[float]] = {}
        for rank, summary in window.summaries(self).items():
            if summary is not None:
                medians[rank], last_step[rank], times[rank] = summary
        if len(medians) < 2:
            return []
        fastest_rank = min(medians, key=lambda r: medians[r])
        fastest = medians[fastest_rank]
        noise = step_to_step_noise(times[fastest_rank])
        out = []
        for rank, m in sorted(medians.items()):
            if m <= 0:
                continue
            score = fastest / m
            if score >= cfg.min_score:
                continue
            pairs = zip(blocks_of(times[fastest_rank], cfg.blocks), blocks_of(times[rank], cfg.blocks), strict=False)
            block_score = (1 + cfg.min_score) / 2
            slow_blocks = sum(median(f) < block_score * median(r) for f, r in pairs)
            n_blocks = min(cfg.blocks, len(times[rank]), len(times[fastest_rank]))
            gap_in_noise = (m - fastest) / noise if noise > 0 else math.inf
            sustained = len(times[rank]) >= cfg.sustained_steps
            page = sustained and slow_blocks == n_blocks and gap_in_noise > cfg.noise_multiple
            why = "" if page else (
                f"; info only: {len(times[rank])} steps judged (a warning needs {cfg.sustained_steps}), slow in "
                f"{slow_blocks} of {n_blocks} runs of steps (needs all), gap {fmt(gap_in_noise)}x the fastest "
                f"rank's step-to-step noise (needs > {cfg.noise_multiple}): a briefly starved worker on a "
                "shared host looks like this")
            out.append(Finding(
                summary=(f"rank {rank} is a straggler: median work time {fmt(m)} s per step vs {fmt(fastest)} s "
                         f"on the fastest rank {fastest_rank} (score {score:.2f} < {cfg.min_score}){why}"),
                evidence={"score": round(score, 4), "median_work_seconds": m, "fastest_rank": fastest_rank,
                          "fastest_median_work_seconds": fastest, "window_steps": cfg.window_steps,
                          "steps_judged": len(times[rank]), "slow_blocks": slow_blocks, "blocks": n_blocks,
                          "gap_in_noise": round(gap_in_noise, 2) if math.isfinite(gap_in_noise) else None},
                step=last_step[rank], rank=rank, severity=None if page else Severity.INFO,
            ))
        return out
