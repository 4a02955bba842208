"""Tables for the rules only a multi-rank job reveals: job windows in, findings out."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from healthd.rules.base import Finding
from healthd.rules.gradient_norm_mismatch import GradientNormMismatch, leave_one_out_medians
from healthd.rules.loss_scale_collapse import LossScaleCollapse
from healthd.rules.rank_desync import RankDesync, _group, _latest_shared_fingerprints
from healthd.rules.rank_stalled import RankStalled
from healthd.rules.straggler_rank import StragglerRank, work_seconds
from healthd.rules.training_stalled import TrainingStalled
from healthd.settings import StoreSettings
from healthd.state.store import Store
from healthd.state.windows import JobMeta, JobWindow, RankStatus, finite
from healthd.wire.records import StepRecord
from healthd.wire.schema import HeartbeatReport, StepReport
from tests.healthd.factories import steps, window

NOW = 2000.0


def rank(r: int, *, n: int = 10, last_step_time: float | None = NOW, heartbeat_time: float | None = NOW,
         closing: bool = False, **series: Sequence[Any] | Any) -> RankStatus:
    st: list[StepRecord] = [msgspec.structs.replace(s, rank=r) for s in steps(n, **series)] if n else []
    hb = HeartbeatReport(job="j", rank=r, time=NOW, closing=closing) if heartbeat_time is not None else None
    return RankStatus(rank=r, steps=st, last_step=st[-1].step if st else None,
                      last_step_time=last_step_time if st else None, last_heartbeat=hb,
                      last_heartbeat_time=heartbeat_time, closed=closing)


def job(*ranks: RankStatus, now: float = NOW) -> JobWindow:
    return JobWindow(job="j", meta=JobMeta(), now=now, ranks={r.rank: r for r in ranks})


def ranks_of(findings: Any) -> list[int | None]:
    return sorted(f.rank for f in findings)


# ------------------------------------------------------------------ StragglerRank
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


# ------------------------------------------------------------------ RankStalled / TrainingStalled
def test_rank_stalled_tells_hang_from_death_and_exit() -> None:
    rule = RankStalled(RankStalled.Config(stall_seconds=60, heartbeat_timeout_seconds=15))
    w = job(
        rank(0),  # stepping
        rank(1, last_step_time=NOW - 100),  # hung: heartbeats continue
        rank(2, last_step_time=NOW - 100, heartbeat_time=NOW - 90),  # dead: heartbeats stopped
        rank(3, last_step_time=NOW - 100, closing=True),  # exited cleanly
        rank(4, last_step_time=NOW - 30),  # slow, within the timeout
    )
    found = {f.rank: f for f in rule.evaluate(w)}
    assert sorted(found) == [1, 2]
    assert found[1].evidence["heartbeat_alive"] is True and "hang" in found[1].summary
    assert found[2].evidence["heartbeat_alive"] is False and "died" in found[2].summary
    assert TrainingStalled(TrainingStalled.Config(stall_seconds=60)).evaluate(w) is None


def test_training_stalled_when_every_live_rank_stopped() -> None:
    cfg = TrainingStalled.Config(stall_seconds=60, heartbeat_timeout_seconds=15)
    w = job(rank(0, n=10, last_step_time=NOW - 70), rank(1, n=8, last_step_time=NOW - 80, heartbeat_time=NOW - 50),
            rank(2, last_step_time=NOW - 500, closing=True))
    f = TrainingStalled(cfg).evaluate(w)
    assert f is not None and f.rank is None
    assert f.evidence["rank_furthest_behind"] == 1 and f.evidence["ranks_heartbeat_alive"] == 1
    assert f.evidence["ranks"] == 2
    done = job(rank(0, last_step_time=NOW - 500, closing=True), rank(1, last_step_time=NOW - 500, closing=True))
    assert TrainingStalled(cfg).evaluate(done) is None


# ------------------------------------------------------------------ RankDesync
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


# ------------------------------------------------------------------ GradientNormMismatch
@pytest.mark.parametrize(("norms", "expected"), [
    ([1.0, 1.2, 0.9, 1.1], []),
    ([1.0, 1.2, 30.0, 1.1], [2]),
    ([1.0, 1.2, 0.01, 1.1], [2]),
    ([1.0, 50.0], [0, 1]),  # two ranks: cannot tell which is wrong
])
def test_gradient_norm_mismatch(norms: list[float], expected: list[int]) -> None:
    found = GradientNormMismatch().evaluate(job(*[rank(i, grad_norm_local=v) for i, v in enumerate(norms)]))
    assert ranks_of(found) == expected


# ------------------------------------------------------------------ LossScaleCollapse
@pytest.mark.parametrize(("skipped", "scales", "fires"), [
    ([False] * 10, [65536.0] * 10, False),
    ([False] * 8 + [True, False], [65536.0] * 8 + [32768.0] * 2, False),  # an occasional skip is normal
    ([False] * 4 + [True] * 6, [65536.0 / 2**k for k in [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]], True),  # 6 in a row
    ([False, True] * 5, [1024.0] * 10, False),  # 50 %, but the window is not full
    ([False] * 10, [8.0, 4.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], True),  # fell to <= 1
])
def test_loss_scale_collapse(skipped: list[bool], scales: list[float], fires: bool) -> None:
    f = LossScaleCollapse().evaluate(window(steps(len(skipped), step_skipped=skipped, loss_scale=scales)))
    assert (f is not None) is fires


def test_loss_scale_collapse_skipped_fraction_in_full_window() -> None:
    rule = LossScaleCollapse(LossScaleCollapse.Config(window_steps=10, max_consecutive_skipped=5))
    f = rule.evaluate(window(steps(10, step_skipped=[False, True, False, True, True] * 2, loss_scale=1024.0)))
    assert f is not None and f.evidence["skipped_fraction"] == 0.6


# ------------------------------------------------------------------ LargeBatchGeneralization, noise-scale branch
@pytest.mark.parametrize(("global_batch", "noise_scale", "severity"), [
    (4096, 100.0, "warning"),  # 41x above B_simple
    (512, 100.0, None),  # within 0.1x .. 10x
    (8, 100.0, "info"),  # 0.08x: room for parallelism
    (4096, None, None),  # not measured (no DDP)
])
def test_large_batch_generalization_uses_noise_scale(global_batch: int, noise_scale: float | None,
                                                     severity: str | None) -> None:
    from healthd.rules.large_batch_generalization import LargeBatchGeneralization

    rule = LargeBatchGeneralization()
    f = rule.evaluate(window(steps(5, start=200, batch_size=global_batch // 2), global_batch_size=global_batch,
                             noise_scale=noise_scale))
    # Early in training B_simple is systematically small: not judged before the warm-up.
    early = rule.evaluate(window(steps(5, batch_size=global_batch // 2), global_batch_size=global_batch,
                                 noise_scale=noise_scale))
    assert early is None or early.evidence.get("noise_scale") is None
    if severity is None:
        assert f is None
    else:
        assert f is not None and (f.severity or rule.severity).value == severity
        assert f.evidence["noise_scale"] == noise_scale


# ------------------------------------------------------------------ fast paths vs the direct computations
# Job rules read the store's columns (newest first, only as far back as they need) and compute
# leave-one-out medians from one sort: each is checked against the direct computation over the
# step reports on random jobs, through a real Store so that the column paths are the ones tested.


def test_leave_one_out_medians_match_the_direct_computation() -> None:
    rng = random.Random(1)
    for n in [2, 3, 4, 5, *rng.sample(range(6, 200), 20)]:
        for values in ([rng.gauss(1.0, 0.3) for _ in range(n)],
                       [float(rng.randint(0, 3)) for _ in range(n)],  # ties
                       [rng.choice([0.0, -0.0, 1e-300, 1.0, 1e300]) for _ in range(n)]):
            expected = [statistics.median(values[:i] + values[i + 1:]) for i in range(n)]
            assert repr(leave_one_out_medians(values)) == repr(expected), values


def _stored_job(reports: list[StepReport]) -> JobWindow:
    store = Store(StoreSettings())
    for rep in reports:
        store.apply(rep, NOW)
    return store.job_window("j", NOW)


def _random_job(rng: random.Random) -> list[StepReport]:
    """A few ranks stepping in increasing order, some ahead of others, with missing and non-finite
    values, fingerprints at shared steps, the odd desync, and requests applied twice in a row (a
    client retries a request whose answer it lost before it sends the next)."""
    every = rng.choice([1, 3, 10])
    reports = []
    for r in range(rng.randint(2, 7)):
        scale = rng.choice([1.0, 1.0, 30.0, 0.01])
        slow = rng.choice([1.0, 1.0, 2.0])
        desync = rng.random() < 0.3
        steps_sent = 0
        for _ in range(rng.randint(0, 12)):
            batch = []
            for step_no in range(steps_sent, steps_sent + rng.randint(1, 8)):
                fp = None
                if step_no % every == 0 and rng.random() < 0.9:
                    fp = rng.choice([1.0 + step_no, 0.0, math.nan]) + (1e-3 if desync and step_no > 20 else 0.0)
                batch.append(StepReport(
                    job="j", rank=r, time=NOW, step=step_no, param_fingerprint=fp,
                    step_seconds=rng.choice([0.3 * slow, 0.3 * slow, 0.25, None, math.inf]),
                    comm_seconds=rng.choice([None, 0.1, 0.2, 0.29, 0.4]) if rng.random() < 0.8 else None,
                    grad_norm_local=rng.choice([scale * rng.uniform(0.8, 1.2), None, math.nan, math.inf, 0.0])))
            steps_sent += len(batch)
            reports += batch * (2 if rng.random() < 0.1 else 1)
    return reports


def _straggler_direct(w: JobWindow, cfg: Any) -> list[Finding]:
    medians, last_step = {}, {}
    for rank, st in w.ranks.items():
        if not st.closed:
            times = finite([work_seconds(s.step_seconds, s.comm_seconds) for s in list(st.steps)[-cfg.window_steps:]])
            if len(times) >= cfg.min_steps:
                medians[rank], last_step[rank] = statistics.median(times), st.last_step
    found = []
    if len(medians) >= 2:
        fastest_rank = min(medians, key=lambda r: medians[r])
        for rank, m in sorted(medians.items()):
            if m > 0 and medians[fastest_rank] / m < cfg.min_score:
                found.append((rank, m, fastest_rank, medians[fastest_rank], last_step[rank]))
    return found  # type: ignore[return-value]


def _mismatch_direct(w: JobWindow, cfg: Any) -> list[tuple[int, float, float]]:
    medians = {}
    for rank, st in w.ranks.items():
        norms = finite([s.grad_norm_local for s in list(st.steps)[-cfg.window_steps:]])
        if not st.closed and len(norms) >= cfg.min_steps:
            medians[rank] = statistics.median(norms)
    found = []
    if len(medians) >= 2:
        for rank, m in sorted(medians.items()):
            others = statistics.median([v for r, v in medians.items() if r != rank])
            ratio = m / others if others > 0 else math.inf
            if not (others <= 0 and m <= 0) and (ratio > cfg.max_ratio or ratio < 1 / cfg.max_ratio):
                found.append((rank, m, others))
    return found


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
    return step, {r: fps[step] for r, fps in sorted(by_rank.items()) if step in fps}  # type: ignore[misc]


@pytest.mark.parametrize("seed", range(200))
def test_job_rules_find_what_the_direct_computations_find(seed: int) -> None:
    rng = random.Random(seed)
    w = _stored_job(_random_job(rng))

    straggler = StragglerRank(StragglerRank.Config(window_steps=rng.choice([3, 20]), min_steps=2))
    got = [(f.rank, f.evidence["median_work_seconds"], f.evidence["fastest_rank"],
            f.evidence["fastest_median_work_seconds"], f.step) for f in straggler.evaluate(w)]
    assert repr(got) == repr(_straggler_direct(w, straggler.config))

    mismatch = GradientNormMismatch(GradientNormMismatch.Config(window_steps=rng.choice([1, 5, 20]), min_steps=1))
    got_m = [(f.rank, f.evidence["median_grad_norm_local"], f.evidence["others_median_grad_norm_local"])
             for f in mismatch.evaluate(w)]
    assert repr(got_m) == repr(_mismatch_direct(w, mismatch.config))

    direct = _desync_direct(w)
    assert repr(_latest_shared_fingerprints(w.ranks)) == repr(direct)
    found = RankDesync().evaluate(w)
    if found:
        assert direct is not None and {f.step for f in found} == {direct[0]}
        assert found[0].evidence["ranks_compared"] == len(direct[1])


def test_rank_desync_follows_a_rank_that_is_ahead() -> None:
    # Rank 0 already fingerprinted step 40; the step all three share is 20, where rank 2 differs.
    w = _stored_job([StepReport(job="j", rank=r, time=NOW, step=s,
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
    assert _desync_direct(_stored_job(before + after)) == (90, {0: 90.0, 1: 90.5})  # from before the restart
    assert RankDesync().evaluate(_stored_job(before + after)) == []


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


def test_rank_desync_when_every_rank_differs_is_fast() -> None:
    # A non-broadcast initialisation: 4,096 distinct fingerprints (pairwise comparison took seconds).
    values = {r: 1.0 + r * 1e-3 for r in range(4096)}
    t0 = time.perf_counter()
    groups = _group(values, 1e-6, 0.0)
    assert len(groups) == 4096 and time.perf_counter() - t0 < 1.0


def test_rank_desync_reads_fingerprints_from_the_whole_window() -> None:
    # Fingerprints far apart: the latest is 300 reports back, beyond whole steps' detail window.
    w = _stored_job([StepReport(job="j", rank=r, time=NOW, step=s,
                                param_fingerprint=(1.0 + r) if s == 100 else None)
                     for r in range(2) for s in range(400)])
    found = RankDesync().evaluate(w)
    assert [(f.rank, f.step) for f in found] == [(1, 100)]
