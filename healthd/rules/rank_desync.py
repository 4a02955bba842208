"""RankDesync: parameters that must be identical on every rank are not."""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from operator import is_not
from typing import ClassVar, cast

from pydantic import Field

from healthd.rules.base import Finding, ResolveAfterSteps, Rule, RuleConfig
from healthd.state.windows import JobWindow, RankStatus
from healthd.wire.schema import Severity


class RankDesyncConfig(RuleConfig):
    rtol: float = Field(default=1e-6, ge=0, description="relative difference of fingerprints tolerated")
    atol: float = Field(default=0.0, ge=0, description="absolute difference of fingerprints tolerated")
    resolve_after_steps: ResolveAfterSteps = Field(default=30, description="ticks without the finding before resolving")


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))


def _group(values: dict[int, float], rtol: float, atol: float) -> list[list[int]]:
    """Ranks grouped by fingerprint: each joins the first group (in order of creation) whose first
    rank's fingerprint is ``_close`` to its own, else starts a group.

    Groups' first fingerprints are also kept sorted, so a fingerprint is compared only with those
    within reach of the tolerance: when every rank differs (an initialisation that was never
    broadcast) comparing each with every group would take seconds at thousands of ranks.
    """
    groups: list[list[int]] = []
    firsts: list[tuple[float, int]] = []  # (first fingerprint, group index) of finite groups, sorted
    special: dict[str, int] = {}  # group index of NaN, inf and -inf: close to themselves only
    first = math.nan
    for r, v in values.items():
        if groups and (v == first or _close(first, v, rtol, atol)):  # the first group comes first
            groups[0].append(r)
            continue
        if not groups:
            first = v
        if not math.isfinite(v):
            key = "nan" if math.isnan(v) else str(v)
            if key in special:
                groups[special[key]].append(r)
            else:
                special[key] = len(groups)
                groups.append([r])
            continue
        reach = max(atol, rtol * abs(v) / (1 - rtol)) if rtol < 1 else math.inf
        if math.isfinite(reach):  # |a - v| <= max(rtol * max(|a|, |v|), atol) implies |a - v| <= reach
            reach += 4 * math.ulp(v)  # the bounds below are rounded too
            lo = bisect.bisect_left(firsts, (v - reach, -1))
            near = firsts[lo:bisect.bisect_right(firsts, (v + reach, len(groups)), lo)]
        else:
            near = firsts
        found = [g for first, g in near if _close(first, v, rtol, atol)]
        if found:
            groups[min(found)].append(r)
        else:
            bisect.insort(firsts, (v, len(groups)))
            groups.append([r])
    return groups


# How far back from its newest report a rank's fingerprint is first looked for, before asking whether
# the rank sent any: the client fingerprints every 50 steps by default.
_RECENT_REPORTS = 128


def _fingerprinted(fps: Sequence[float | None], start: int = 0, stop: int | None = None) -> Iterator[int]:
    """Positions from the end (0: the newest report) of the reports that carry a fingerprint,
    from ``start`` to before ``stop``, newest first."""
    present = map(is_not, itertools.islice(reversed(fps), start, stop), itertools.repeat(None))
    return itertools.compress(itertools.count(start), present)


def _latest_shared_fingerprints(ranks: Mapping[int, RankStatus]) -> tuple[int, dict[int, float]] | None:
    """The latest step that at least two of ``ranks`` (the judged ranks, ``JobWindow.judges``, holding one
    shard) fingerprinted, and each such rank's fingerprint there (of a step reported twice, the newest
    report), by rank; None when there is no such step.

    A descending merge of the ranks' fingerprinted steps: a rank's steps arrive in increasing order
    (its client sends its queue oldest first, and retries a batch before it sends the next), so its
    newest reports hold its latest steps, and the merge stops at the first step two ranks share.
    Each rank's columns are read back to that step only, not over the whole window: on a job of
    thousands of ranks this runs on every tick. After a restart from a checkpoint (step numbers go
    back), a rank's fingerprints from before it at steps it has not reached again are left out:
    the ranks are compared as they are now, not as they were before the restart.
    """
    columns: dict[int, tuple[Sequence[float | None], Sequence[float | None]]] = {}
    heads: list[tuple[float, int, int]] = []  # (-step, rank, position from the end)
    # Whether the rank before sent fingerprints. If so, this one is looked at from its newest report
    # back; if not, it is first asked whether it sent any (a count, cheaper than a search that finds
    # nothing): both ways find the same, the first is faster in jobs that send fingerprints.
    recent_first = True
    for rank, st in ranks.items():
        fps = st.columns.get("param_fingerprint")
        steps = st.columns.get("step")
        if fps is None or steps is None:  # a RankStatus built by hand (tests): read the step reports
            fps, steps = st.column("param_fingerprint"), st.column("step")
        pos = next(_fingerprinted(fps, 0, _RECENT_REPORTS), None) if recent_first else None
        if pos is None:
            if fps.count(None) == len(fps):
                recent_first = False
                continue  # no fingerprint from this rank
            pos = next(_fingerprinted(fps, _RECENT_REPORTS if recent_first else 0))
            recent_first = True
        step = steps[-1 - pos]
        if step is None:  # pragma: no cover - the store fills every step's number
            continue
        columns[rank] = (steps, fps)
        heads.append((-step, rank, pos))  # ranks are unique: tuples never compare beyond them
    heapq.heapify(heads)
    while len(heads) >= 2:
        top = heads[0][0]
        at_top: dict[int, int] = {}
        while heads and heads[0][0] == top:
            _, rank, pos = heapq.heappop(heads)
            at_top[rank] = pos
        if len(at_top) >= 2:
            values = {r: columns[r][1][-1 - pos] for r, pos in sorted(at_top.items())}
            return int(-top), cast(dict[int, float], values)  # fingerprinted positions: never None
        # One rank alone at this step (it is ahead of the others): go on with its older fingerprints.
        ((rank, pos),) = at_top.items()
        steps, fps = columns[rank]
        for older in _fingerprinted(fps, pos + 1):
            step = steps[-1 - older]
            if step is not None and -step > top:  # not a step it reported again (a retried request)
                heapq.heappush(heads, (-step, rank, older))
                break
    return None


class RankDesync(Rule[JobWindow, RankDesyncConfig]):
    """Ranks' parameter fingerprints differ at the same step.

    Why: data parallelism assumes every replica holds the same weights after
    each step. A rank-dependent code path (clipping, a scheduler or an
    optimizer state touched on one rank only, a non-broadcast initialisation,
    a missed all-reduce, a bit flip) silently turns one job into N diverging
    models; the loss may look fine. TrainCheck (Jiang et al., OSDI 2025) found
    real silent errors of exactly this kind, e.g. BLOOM-176B's gradient
    clipping diverging across ranks.

    How: the client sends a cheap parameter fingerprint (a fixed weighted sum
    of per-tensor sums and squared norms, computed on the device without a
    host sync) every N steps, at the same steps on every rank. At the latest
    step that at least two live ranks fingerprinted (since the last restart
    from a checkpoint, if any; once the job ended, every rank counts, so a
    job that closes before a tick caught it is still judged), ranks are grouped by
    fingerprint (``rtol``, ``atol``); ranks outside the largest group (ties:
    the group holding the lowest rank) are findings.

    Sharded models (FSDP2, HSDP): a rank fingerprints its own shards, so
    ranks are compared only with the ranks holding the same shard (HSDP's
    replicas; under plain FSDP there is none and nothing is compared). Tensor
    parallelism without that information still needs the rule turned off.
    """

    name: ClassVar[str] = "RankDesync"
    severity: ClassVar[Severity] = Severity.CRITICAL
    Config = RankDesyncConfig
    advice: ClassVar[str] = (
        "Replicas diverged. Look for code that runs on some ranks only (if rank == 0 around optimizer, clipping, "
        "scheduler or parameter edits), initialisation that is not broadcast, and model changes after wrapping "
        "in DDP; compare state_dicts of two ranks at the reported step."
    )

    def evaluate(self, window: JobWindow) -> list[Finding]:
        by_shard: dict[int | None, dict[int, RankStatus]] = {}
        for r, st in window.ranks.items():
            if window.judges(st):  # live ranks, or every rank once the job's window is final
                by_shard.setdefault(st.shard_index, {})[r] = st
        return [f for ranks in by_shard.values() if len(ranks) >= 2 for f in self._compare(ranks)]

    def _compare(self, ranks: Mapping[int, RankStatus]) -> list[Finding]:
        """The findings among ranks that should hold equal parameters."""
        cfg = self.config
        shared = _latest_shared_fingerprints(ranks)
        if shared is None:
            return []
        step, values = shared
        groups = _group(values, cfg.rtol, cfg.atol)
        if len(groups) == 1:
            return []
        reference = max(groups, key=lambda g: (len(g), -g[0]))
        ref_value = values[reference[0]]
        agreeing = set(reference)
        out = []
        for r, v in values.items():
            if r in agreeing:
                continue
            rel = abs(v - ref_value) / max(abs(ref_value), 1e-300)
            out.append(Finding(
                summary=(f"rank {r}'s parameters differ from rank {reference[0]}'s at step {step} "
                         f"(fingerprint {v:.10g} vs {ref_value:.10g}, relative difference {rel:.3g})"),
                evidence={"fingerprint": v, "reference_fingerprint": ref_value, "reference_rank": reference[0],
                          "relative_difference": rel, "ranks_compared": len(values),
                          "ranks_agreeing": len(reference)},
                step=step, rank=r,
            ))
        return out
