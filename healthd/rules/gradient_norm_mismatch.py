"""GradientNormMismatch: one rank's local gradients are wildly different in scale from the others'."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ForSteps,
    Hints,
    Rule,
    WindowedConfig,
    WindowSteps,
    fmt,
    median,
)
from healthd.state.windows import JobWindow, RankStatus
from healthd.wire.schema import Severity


class GradientNormMismatchConfig(WindowedConfig):
    window_steps: WindowSteps = Field(default=20, description="last steps of each rank whose median is compared")
    min_steps: int = Field(default=5, ge=1, description="steps a rank needs in the window to be judged")
    max_ratio: float = Field(default=10.0, gt=1, description="a rank's median local norm over the others' median "
                                                             "(or its inverse) above this is a finding")
    for_steps: ForSteps = Field(default=3, description="consecutive engine ticks with the finding before firing")


def leave_one_out_medians(values: Sequence[float]) -> list[float]:
    """For each ``values[i]``, the median of all the other values, as ``statistics.median`` gives it.

    One stable sort instead of a sort per value: O(n log n) where the direct way is O(n^2 log n),
    which at thousands of ranks took tens of milliseconds per tick. Needs at least two values.
    """
    order = sorted(range(len(values)), key=values.__getitem__)
    xs = [values[i] for i in order]
    position = [0] * len(values)
    for p, i in enumerate(order):
        position[i] = p
    rest = len(values) - 1
    half = rest // 2
    out = []
    for p in position:
        # The others, sorted, are xs without index p: their j-th is xs[j] below p, xs[j + 1] from p on.
        upper = xs[half + 1] if half >= p else xs[half]
        if rest % 2:
            out.append(upper)
        else:
            lower = xs[half] if half - 1 >= p else xs[half - 1]
            out.append((lower + upper) / 2)
    return out


class GradientNormMismatch(Rule[JobWindow, GradientNormMismatchConfig]):
    """A rank's local (pre-all-reduce) gradient norm is ``max_ratio`` times above or below the other ranks'.

    Why: in data parallelism every rank computes gradients of the same model
    on samples of the same distribution, so local gradient norms agree to
    within sampling noise. A rank fed bad data (an unnormalised or corrupt
    shard, wrong labels, a different preprocessing path, a broken host)
    shows up as local gradients of a different scale, and its gradients are
    averaged into everyone's update.

    How: per rank, the median of ``grad_norm_local`` (sent by the client's
    DDP comm hook) over its last ``window_steps`` steps, compared with the
    median of the other ranks' medians. With two ranks the comparison cannot
    tell which one is wrong: both are reported.
    """

    name: ClassVar[str] = "GradientNormMismatch"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = GradientNormMismatchConfig
    advice: ClassVar[str] = (
        "Check the data this rank reads: its shard of the sampler (DistributedSampler with the right rank), "
        "preprocessing and normalisation, corrupt files, labels. Print a batch's statistics on this rank and "
        "on another."
    )

    hints: ClassVar[Hints] = Hints(summarized=True)

    def rank_summary(self, st: RankStatus) -> tuple[float, int | None] | None:
        """The rank's median local gradient norm over its last steps and its last step; None: not judged."""
        if st.closed:
            return None
        norms = st.values("grad_norm_local", self.config.window_steps)
        return (median(norms), st.last_step) if len(norms) >= self.config.min_steps else None

    def evaluate(self, window: JobWindow) -> list[Finding]:
        cfg = self.config
        medians: dict[int, float] = {}
        steps: dict[int, int | None] = {}
        for rank, summary in window.summaries(self).items():
            if summary is not None:
                medians[rank], steps[rank] = summary
        if len(medians) < 2:
            return []
        others_medians = dict(zip(medians, leave_one_out_medians(list(medians.values())), strict=True))
        out = []
        for rank, m in sorted(medians.items()):
            others = others_medians[rank]
            if others <= 0 and m <= 0:
                continue
            ratio = m / others if others > 0 else float("inf")
            if ratio > cfg.max_ratio or ratio < 1 / cfg.max_ratio:
                out.append(Finding(
                    summary=(f"rank {rank}'s local gradient norm (median {fmt(m)}) is {fmt(ratio)}x the other "
                             f"ranks' (median {fmt(others)}); limit {cfg.max_ratio}x"),
                    evidence={"median_grad_norm_local": m, "others_median_grad_norm_local": others,
                              "ratio": ratio, "max_ratio": cfg.max_ratio},
                    step=steps[rank], rank=rank,
                ))
        return out
