"""healthd.rules.straggler_rank: a rank whose median step work time is well above the fastest rank's."""

from __future__ import annotations

import random
import statistics
from typing import Any

import pytest

from healthd.rules.straggler_rank import StragglerRank, work_seconds
from healthd.state.windows import JobWindow, finite
from healthd.wire.schema import Severity
from tests.healthd.factories import job, random_job, rank, ranks_of, stored_job


@pytest.mark.parametrize(("times", "comm", "expected"), [
    ([0.10, 0.10, 0.10], None, []),  # equal
    ([0.10, 0.12, 0.11], None, []),  # within 0.75
    ([0.10, 0.10, 0.20], None, [2]),  # score 0.5
    # DDP: equal step times, but rank 0 and 1 spend most of it waiting for rank 2
    ([0.30, 0.30, 0.30], [0.20, 0.20, 0.0], [2]),
    ([0.30, 0.30, 0.30], [0.02, 0.0, 0.01], []),
])
def test_straggler(times: list[float], comm: list[float] | None, expected: list[int]) -> None:
    rs = [rank(i, step_seconds=t, comm_seconds=None if comm is None else comm[i]) for i, t in enumerate(times)]
    found = StragglerRank().evaluate(job(*rs))
    assert ranks_of(found) == expected
    for f in found:
        assert f.evidence["score"] < 0.75


def test_straggler_needs_two_judged_ranks_and_ignores_closed() -> None:
    assert StragglerRank().evaluate(job(rank(0, step_seconds=0.1), rank(1, n=2, step_seconds=1.0))) == []
    assert StragglerRank().evaluate(job(rank(0, step_seconds=0.1), rank(1, step_seconds=1.0, closing=True))) == []


# ------------------------------------------------------------------ the evidence a page needs
# Under DDP every rank waits in the gradient all-reduce: step times are equal and a slow rank shows as a
# larger work share (step - comm). A warning needs a sustained, consistent gap larger than the job's own
# step-to-step noise; a worker starved for a while on a shared host is info at most.

def _jitter(n: int, base: float, rel: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [base * (1 + rng.uniform(-rel, rel)) for _ in range(n)]


def _ddp(work: list[list[float]]) -> JobWindow:
    """Ranks whose step time is the slowest rank's work at each step; the others wait in comm."""
    step = [max(ws) + 0.002 for ws in zip(*work, strict=True)]
    return job(*(rank(r, n=len(ws), step_seconds=step, comm_seconds=[s - w for s, w in zip(step, ws, strict=True)])
                 for r, ws in enumerate(work)))


def _starved(n: int, slow: int, seed: int) -> list[float]:
    """Healthy work times with the last ``slow`` steps 3x longer (a burst of CPU starvation)."""
    w = _jitter(n, 0.10, 0.1, seed)
    return w[:n - slow] + [3 * t for t in w[n - slow:]]


def _noisy(n: int, scale: float, seed: int) -> list[float]:
    """An oversubscribed host: every rank's work time spread by preemptions (log-normal, sigma 0.5)."""
    rng = random.Random(seed)
    return [scale * 0.1 * rng.lognormvariate(0.0, 0.5) for _ in range(n)]


@pytest.mark.parametrize(("case", "work", "severity"), [
    # rank 1 sleeps 50 % extra every step (score 0.67): a straggler, paged
    ("sleeps 50% extra every step", [_jitter(40, 0.10, 0.1, 1), _jitter(40, 0.15, 0.1, 2)], Severity.WARNING),
    ("3x slower every step", [_jitter(40, 0.10, 0.2, 3), _jitter(40, 0.30, 0.2, 4)], Severity.WARNING),
    # starved for 25 of the last 40 steps: the median moved, but the first runs of steps were not slow
    ("starved for 25 of 40 steps", [_jitter(40, 0.10, 0.1, 5), _starved(40, 25, 6)], Severity.INFO),
    # slow on every step, but only 20 steps seen: not yet sustained
    ("slow, only 20 steps so far", [_jitter(20, 0.10, 0.1, 7), _jitter(20, 0.15, 0.1, 8)], Severity.INFO),
    # both ranks preempted at random, the same distribution: nothing to page
    ("oversubscribed host", [_noisy(40, 1.0, 9), _noisy(40, 1.0, 10)], None),
    ("equal ranks", [_jitter(40, 0.10, 0.1, 11), _jitter(40, 0.11, 0.1, 12)], None),
])
def test_straggler_pages_only_on_sustained_consistent_evidence(case: str, work: list[list[float]],
                                                               severity: Severity | None) -> None:
    found = StragglerRank().evaluate(_ddp(work))
    if severity is None:
        assert found == [], case
        return
    assert ranks_of(found) == [1], case
    (f,) = found
    assert (f.severity or StragglerRank.severity) is severity, (case, f.summary)
    assert f.evidence["score"] < 0.75
    if severity is Severity.INFO:
        assert "info only" in f.summary


def test_straggler_evidence_thresholds_are_config() -> None:
    work = _ddp([_jitter(40, 0.10, 0.1, 5), _starved(40, 25, 6)])
    (f,) = StragglerRank().evaluate(work)
    assert f.severity is Severity.INFO and (f.evidence["slow_blocks"], f.evidence["blocks"]) == (3, 4)
    (f,) = StragglerRank(StragglerRank.Config(blocks=1)).evaluate(work)  # the whole window: its median moved
    assert f.severity is None
    with pytest.raises(ValueError, match="blocks"):
        StragglerRank.Config(blocks=0)


@pytest.mark.parametrize("seed", range(50))
def test_a_jittery_straggler_is_paged_and_equal_noisy_ranks_are_not(seed: int) -> None:
    # 50 % extra work every step under ±20 % jitter on both ranks: a warning on every seed
    (f,) = StragglerRank().evaluate(_ddp([_jitter(40, 0.10, 0.2, seed), _jitter(40, 0.15, 0.2, seed + 1000)]))
    assert f.rank == 1 and f.severity is None, f.summary
    # equal ranks on a host that preempts both at random: never a warning
    noisy = StragglerRank().evaluate(_ddp([_noisy(40, 1.0, seed), _noisy(40, 1.0, seed + 1000)]))
    assert all(f.severity is Severity.INFO for f in noisy), [f.summary for f in noisy]


# ------------------------------------------------------------------ fast path vs the direct computation
# The rule reads the store's columns (newest first, only as far back as it needs): checked against the
# direct computation over the step reports on random jobs, through a real Store.


def _straggler_direct(w: JobWindow, cfg: Any) -> list[tuple[int, float, int, float, int | None]]:
    medians, last_step = {}, {}
    for rank_id, st in w.ranks.items():
        if not st.closed:
            times = finite([work_seconds(s.step_seconds, s.comm_seconds) for s in list(st.steps)[-cfg.window_steps:]])
            if len(times) >= cfg.min_steps:
                medians[rank_id], last_step[rank_id] = statistics.median(times), st.last_step
    found = []
    if len(medians) >= 2:
        fastest_rank = min(medians, key=lambda r: medians[r])
        for rank_id, m in sorted(medians.items()):
            if m > 0 and medians[fastest_rank] / m < cfg.min_score:
                found.append((rank_id, m, fastest_rank, medians[fastest_rank], last_step[rank_id]))
    return found


@pytest.mark.parametrize("seed", range(200))
def test_straggler_finds_what_the_direct_computation_finds(seed: int) -> None:
    rng = random.Random(seed)
    w = stored_job(random_job(rng))

    straggler = StragglerRank(StragglerRank.Config(window_steps=rng.choice([3, 20]), min_steps=2))
    got = [(f.rank, f.evidence["median_work_seconds"], f.evidence["fastest_rank"],
            f.evidence["fastest_median_work_seconds"], f.step) for f in straggler.evaluate(w)]
    assert repr(got) == repr(_straggler_direct(w, straggler.config))
