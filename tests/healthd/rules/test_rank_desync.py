"""healthd.rules.rank_desync: ranks' parameter fingerprints differ at the same step."""

from __future__ import annotations

import math
import random

import pytest

from healthd.rules.rank_desync import RankDesync, _group, _latest_shared_fingerprints
from healthd.state.windows import JobWindow, RankStatus
from healthd.wire.schema import StepReport
from tests.healthd.factories import NOW, job, random_job, rank, ranks_of, stored_job


def fp_rank(r: int, values: list[float | None], every: int = 1) -> RankStatus:
    return rank(r, n=len(values), param_fingerprint=values)


@pytest.mark.parametrize(("per_rank", "expected"), [
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], []),
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0 + 1e-3]], [1]),
    ([[1.0, 2.0, 3.0 + 1e-3], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [0]),  # majority wins
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0 * (1 + 1e-9)]], []),  # within rtol
    ([[1.0, None, None], [1.0, 2.0, 5.0]], []),  # latest shared fingerprint is step 0
])
def test_rank_desync(per_rank: list[list[float | None]], expected: list[int]) -> None:
    found = RankDesync().evaluate(job(*[fp_rank(r, v) for r, v in enumerate(per_rank)]))
    assert ranks_of(found) == expected


def test_rank_desync_names_the_step() -> None:
    found = RankDesync().evaluate(job(fp_rank(0, [1.0, 2.0]), fp_rank(1, [1.0, 2.5])))
    assert len(found) == 1 and found[0].step == 1 and found[0].evidence["reference_rank"] == 0


# ------------------------------------------------------------------ fast paths vs the direct computations
# The rule reads the store's columns: checked against the direct computation over the step reports
# on random jobs, through a real Store so that the column paths are the ones tested.


def _desync_direct(w: JobWindow) -> tuple[int, dict[int, float]] | None:
    by_rank = {r: {s.step: s.param_fingerprint for s in st.steps if s.param_fingerprint is not None}
               for r, st in w.ranks.items() if not st.closed}
    by_rank = {r: fps for r, fps in by_rank.items() if fps}
    counts: dict[int, int] = {}
    for fps in by_rank.values():
        for step in fps:
            counts[step] = counts.get(step, 0) + 1
    shared = [s for s, n in counts.items() if n >= 2]
    if len(by_rank) < 2 or not shared:
        return None
    step = max(shared)
    return step, {r: fps[step] for r, fps in sorted(by_rank.items()) if step in fps}


@pytest.mark.parametrize("seed", range(200))
def test_rank_desync_finds_what_the_direct_computation_finds(seed: int) -> None:
    rng = random.Random(seed)
    w = stored_job(random_job(rng))

    direct = _desync_direct(w)
    assert repr(_latest_shared_fingerprints(w.ranks)) == repr(direct)
    found = RankDesync().evaluate(w)
    if found:
        assert direct is not None and {f.step for f in found} == {direct[0]}
        assert found[0].evidence["ranks_compared"] == len(direct[1])


def test_rank_desync_follows_a_rank_that_is_ahead() -> None:
    # Rank 0 already fingerprinted step 40; the step all three share is 20, where rank 2 differs.
    w = stored_job([StepReport(job="j", rank=r, time=NOW, step=s,
                               param_fingerprint=(s + (0.5 if r == 2 else 0.0)) if s % 20 == 0 else None)
                    for r, last in ((0, 45), (1, 30), (2, 30)) for s in range(last)])
    found = RankDesync().evaluate(w)
    assert [(f.rank, f.step, f.evidence["ranks_compared"]) for f in found] == [(2, 20, 3)]


def test_rank_desync_after_a_restart_compares_the_ranks_as_they_are_now() -> None:
    # Rank 1 diverged at step 90; the job restarted from the checkpoint at step 60 and agrees at 70.
    before = [StepReport(job="j", rank=r, time=NOW, step=s, param_fingerprint=(s + (0.5 if r and s == 90 else 0.0))
                         if s % 10 == 0 else None) for r in range(2) for s in range(100)]
    after = [StepReport(job="j", rank=r, time=NOW, step=s, param_fingerprint=float(s) if s % 10 == 0 else None)
             for r in range(2) for s in range(60, 80)]
    assert _desync_direct(stored_job(before + after)) == (90, {0: 90.0, 1: 90.5})  # from before the restart
    assert RankDesync().evaluate(stored_job(before + after)) == []


def _group_direct(values: dict[int, float], rtol: float, atol: float) -> list[list[int]]:
    groups: list[list[int]] = []
    for r, v in values.items():
        for g in groups:
            if math.isclose(values[g[0]], v, rel_tol=rtol, abs_tol=atol) or (math.isnan(values[g[0]])
                                                                             and math.isnan(v)):
                g.append(r)
                break
        else:
            groups.append([r])
    return groups


@pytest.mark.parametrize(("rtol", "atol"), [(1e-6, 0.0), (0.0, 0.0), (1e-3, 1e-9), (0.0, 0.01), (0.5, 0.0),
                                            (1.0, 0.0), (2.0, 0.1)])
def test_rank_desync_groups_as_first_fit(rtol: float, atol: float) -> None:
    rng = random.Random(7)
    for _ in range(50):
        base = rng.choice([1.0, 1e6, 1e-8, 0.0, -3.0])
        values = {r: rng.choice([base, base * (1 + rng.choice([1e-7, 1e-6, 2e-6, 1e-3, -1e-6])), base + 0.005,
                                 rng.uniform(-10, 10), math.nan, math.inf, -math.inf, -0.0])
                  for r in range(rng.randint(1, 40))}
        assert _group(values, rtol, atol) == _group_direct(values, rtol, atol), values


def test_rank_desync_when_every_rank_differs_compares_each_rank_a_few_times(monkeypatch) -> None:
    # A non-broadcast initialisation: 4,096 distinct fingerprints. Comparing each with every group
    # would be ~8.4 million comparisons (seconds); counted, not timed: the machine is shared.
    import healthd.rules.rank_desync as module

    calls = 0
    close = module._close

    def counting(*args):
        nonlocal calls
        calls += 1
        return close(*args)

    monkeypatch.setattr(module, "_close", counting)
    values = {r: 1.0 + r * 1e-3 for r in range(4096)}
    groups = _group(values, 1e-6, 0.0)
    assert len(groups) == 4096 and calls <= 3 * len(values)


def test_rank_desync_reads_fingerprints_from_the_whole_window() -> None:
    # Fingerprints far apart: the latest is 300 reports back, beyond whole steps' detail window.
    w = stored_job([StepReport(job="j", rank=r, time=NOW, step=s,
                               param_fingerprint=(1.0 + r) if s == 100 else None)
                    for r in range(2) for s in range(400)])
    found = RankDesync().evaluate(w)
    assert [(f.rank, f.step) for f in found] == [(1, 100)]
