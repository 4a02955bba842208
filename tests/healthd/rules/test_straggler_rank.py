"""healthd.rules.straggler_rank: a rank whose median step work time is well above the fastest rank's."""

from __future__ import annotations

import random
import statistics
from typing import Any

import pytest

from healthd.rules.straggler_rank import StragglerRank, work_seconds
from healthd.state.windows import JobWindow, finite
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
