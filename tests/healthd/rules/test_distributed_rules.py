"""Tables for the rules only a multi-rank job reveals: job windows in, findings out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from healthd.rules.base import JobMeta, JobWindow, RankStatus
from healthd.rules.gradient_norm_mismatch import GradientNormMismatch
from healthd.rules.loss_scale_collapse import LossScaleCollapse
from healthd.rules.rank_desync import RankDesync
from healthd.rules.rank_stalled import RankStalled
from healthd.rules.straggler_rank import StragglerRank
from healthd.rules.training_stalled import TrainingStalled
from healthd.schema import HeartbeatReport, StepReport
from tests.healthd.factories import steps, window

NOW = 2000.0


def rank(r: int, *, n: int = 10, last_step_time: float | None = NOW, heartbeat_time: float | None = NOW,
         closing: bool = False, **series: Sequence[Any] | Any) -> RankStatus:
    st: list[StepReport] = [s.model_copy(update={"rank": r}) for s in steps(n, **series)] if n else []
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
