"""healthd.engine.scheduler: checkpoints chosen by step numbers, judged within a CPU budget on the window as of
each; no step unseen, NaN at once, shedding past the lag counted, the wait exported."""

from __future__ import annotations

import json
import math
from typing import ClassVar

from prometheus_client import generate_latest
from starlette.testclient import TestClient

from healthd.engine.scheduler import EvaluationQueue
from healthd.rules.base import Finding, Rule, RuleConfig
from healthd.server.app import create_app
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.state.windows import RankWindow


class FakeTimer:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_budget_refills_at_its_share_up_to_the_burst_and_charges_go_negative() -> None:
    timer = FakeTimer()
    q = EvaluationQueue(share=0.25, burst_seconds=0.1, timer=timer)
    assert q.has_budget()
    q.charge(0.3)  # an urgent evaluation may overdraw
    assert not q.has_budget()
    timer.t = 0.7  # +0.175 s of budget: still 0.025 short
    assert not q.has_budget()
    timer.t = 0.9  # +0.05
    assert q.has_budget()
    timer.t = 100.0
    q.has_budget()
    q.charge(0.1)  # refilled to the burst, no further
    assert not q.has_budget()


def test_share_one_is_no_budget() -> None:
    q = EvaluationQueue(share=1.0, burst_seconds=0.1, timer=FakeTimer())
    q.charge(100.0)
    assert q.has_budget()


def _steps(*numbers: int, nan: int | None = None) -> list[tuple[int, bool]]:
    return [(n, n == nan) for n in numbers]


def test_checkpoints_are_the_first_step_each_new_block_and_a_nonfinite_step_with_the_one_before() -> None:
    q = EvaluationQueue(share=1.0, burst_seconds=1.0)
    assert not q.observe(("j", 0, None), 1.0, 12, _steps(*range(12)), every=5)
    assert [t for t, _ in q.take(("j", 0, None))] == [1, 6, 11]  # steps 0, 5, 10 (steps_total 1, 6, 11)
    assert q.observe(("j", 0, None), 2.0, 15, _steps(12, 13, 14, nan=13), every=5)
    assert q.take(("j", 0, None)) == [(13, 2), (14, 1)]  # step 12 (before the NaN) and 13; steps since the last
    assert not q.observe(("j", 0, None), 3.0, 16, _steps(15), every=5)
    assert q.take(("j", 0, None)) == [(16, 2)]


def test_a_ranks_first_steps_are_each_a_checkpoint() -> None:
    q = EvaluationQueue(share=1.0, burst_seconds=1.0)
    q.observe(("j", 0, None), 1.0, 14, _steps(*range(14)), every=5, dense=3)
    assert [t for t, _ in q.take(("j", 0, None))] == [1, 2, 3, 6, 11]  # steps 0, 1, 2, then 5, 10


def test_checkpoints_do_not_depend_on_how_steps_are_split() -> None:
    whole = EvaluationQueue(share=1.0, burst_seconds=1.0)
    whole.observe(("j", 0, None), 1.0, 23, _steps(*range(0, 46, 2), nan=30), every=5)
    split = EvaluationQueue(share=1.0, burst_seconds=1.0)
    for i in range(23):
        split.observe(("j", 0, None), 1.0, i + 1, _steps(2 * i, nan=30), every=5)
    assert whole.take(("j", 0, None)) == split.take(("j", 0, None))


def test_queue_is_oldest_first_and_a_checkpoint_is_queued_once() -> None:
    q = EvaluationQueue(share=1.0, burst_seconds=1.0)
    q.observe(("j", 1, None), 10.0, 1, _steps(0), every=5)
    q.observe(("j", 0, None), 11.0, 1, _steps(0), every=5)
    q.observe(("j", 1, None), 12.0, 6, _steps(1, 2, 3, 4, 5), every=5)
    q.finish(("j", 1, None), 12.5, 6)  # already a checkpoint
    q.observe(("k", 0, None), 13.0, 1, _steps(0), every=5)
    assert q.waiting(("j", 1, None)) == 2  # keeps its place and its oldest arrival
    assert q.keys() == [("j", 1, None), ("j", 0, None), ("k", 0, None)] and q.keys("k") == [("k", 0, None)]
    assert q.oldest() == ("j", 1, None) and q.oldest_since() == 10.0
    assert q.take(("j", 1, None)) == [(1, 1), (6, 5)] and q.take(("j", 1, None)) == []
    q.drop_job("j")
    assert q.keys() == [("k", 0, None)] and len(q) == 1


def test_a_rank_too_far_behind_sheds_its_oldest_checkpoints_and_counts_them() -> None:
    q = EvaluationQueue(share=1.0, burst_seconds=1.0)
    q.observe(("j", 0, None), 1.0, 40, _steps(*range(40)), every=5)  # checkpoints at totals 1, 6, ..., 36
    assert q.shed(("j", 0, None), before=30) == 6 and q.shed_total == 6
    assert q.take(("j", 0, None)) == [(31, 31), (36, 5)]  # the first judged one covers the shed steps
    q.observe(("j", 0, None), 2.0, 41, _steps(40), every=5)
    assert q.shed(("j", 0, None), before=100) == 1 and len(q) == 0 and q.shed_total == 7


def test_a_rank_whose_state_was_reset_starts_over() -> None:
    q = EvaluationQueue(share=1.0, burst_seconds=1.0)
    q.observe(("j", 0, None), 1.0, 10, _steps(*range(10)), every=5)
    q.take(("j", 0, None))
    q.observe(("j", 0, None), 2.0, 3, _steps(0, 1, 2), every=5)  # the store forgot the rank: totals restart
    assert q.take(("j", 0, None)) == [(1, 1)]


class Seen(Rule[RankWindow, RuleConfig]):
    """Test rule: records the new steps of each evaluation; finds while the loss is non-finite."""

    name: ClassVar[str] = "Seen"
    Config = RuleConfig
    calls: ClassVar[list[tuple[int, list[int]]]] = []

    def evaluate(self, w: RankWindow) -> Finding | None:
        Seen.calls.append((w.rank, [s.step for s in w.new]))
        bad = [s for s in w.new if s.loss is not None and not math.isfinite(s.loss)]
        if bad:
            return Finding(summary="nan", evidence={"loss": bad[0].loss}, step=bad[0].step, rank=w.rank)
        return None


def _body(rank: int, start: int, n: int, nan_at: int | None = None) -> bytes:
    reports = [{"kind": "step", "job": "j", "rank": rank, "time": 1.0, "step": s,
                "loss": math.nan if s == nan_at else 1.0} for s in range(start, start + n)]
    return json.dumps({"schema_version": 1, "reports": reports}, allow_nan=True).encode()


def _starved(hd: Healthd) -> None:
    """Spend the whole budget: with a tiny share it stays spent for the length of a test."""
    hd.queue.charge(1e6)


def _healthd() -> Healthd:
    Seen.calls = []
    return build(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1e-6, "max_steps_per_evaluation": 5,
                                                   "dense_checkpoint_steps": 0}}),
                 rules=[Seen])


def test_without_budget_ranks_wait_and_their_checkpoints_cover_every_step() -> None:
    hd = _healthd()
    _starved(hd)
    hd.ingest(_body(0, 0, 10))
    hd.ingest(_body(1, 0, 10))
    hd.ingest(_body(0, 10, 10))
    assert Seen.calls == [] and hd.queue.keys() == [("j", 0, None), ("j", 1, None)]
    hd.settle()
    # oldest first, each checkpoint on its own window: what it saw new is what a prompt server saw
    assert Seen.calls == [(0, [0]), (0, [1, 2, 3, 4, 5]), (0, [6, 7, 8, 9, 10]), (0, [11, 12, 13, 14, 15]),
                          (1, [0]), (1, [1, 2, 3, 4, 5])]
    assert len(hd.queue) == 0
    Seen.calls = []
    closing = {"kind": "heartbeat", "job": "j", "rank": 0, "time": 2.0, "closing": True}
    hd.ingest(json.dumps({"schema_version": 1, "reports": [closing]}).encode())
    assert Seen.calls == [(0, [16, 17, 18, 19])]  # a closing rank's last steps: no step unseen


def test_a_nan_is_evaluated_at_once_whatever_the_budget() -> None:
    hd = _healthd()
    _starved(hd)
    hd.ingest(_body(0, 0, 10, nan_at=6))
    (alert,) = hd.engine.firing()
    assert alert.step == 6 and alert.fired_step == 6
    assert Seen.calls == [(0, [0]), (0, [1, 2, 3, 4, 5]), (0, [6])]  # on the window as of each checkpoint
    assert len(hd.queue) == 0  # steps 7-9 wait for their checkpoint (step 10)


def test_an_infinite_gradient_norm_is_evaluated_at_once_too() -> None:
    hd = _healthd()
    _starved(hd)
    reports = [{"kind": "step", "job": "j", "rank": 0, "time": 1.0, "step": s, "loss": 1.0,
                "grad_norm": math.inf if s == 3 else 1.0} for s in range(6)]
    hd.ingest(json.dumps({"schema_version": 1, "reports": reports}, allow_nan=True).encode())
    # the step before it is a checkpoint too; step 5's, in the same request, is judged with them
    assert Seen.calls == [(0, [0]), (0, [1, 2]), (0, [3]), (0, [4, 5])]
    assert len(hd.queue) == 0


def test_with_budget_a_request_is_evaluated_before_it_is_answered() -> None:
    hd = build(Settings.from_mapping({"engine": {"dense_checkpoint_steps": 0}}), rules=[Seen])  # a share and a burst
    Seen.calls = []
    hd.ingest(_body(0, 0, 7))
    assert Seen.calls == [(0, [0]), (0, [1, 2, 3, 4, 5])] and len(hd.queue) == 0


def test_a_starved_rank_sheds_what_it_cannot_rebuild_but_sees_every_step_and_the_metric_says_so() -> None:
    hd = _healthd()
    _starved(hd)
    lag = hd.store.settings.detail_steps // 2
    for start in range(0, 200, 10):
        hd.ingest(_body(0, start, 10))
    shed = hd.queue.shed_total
    assert shed > 0
    forced = list(Seen.calls)  # judged budget or not: its steps would otherwise leave the window unseen
    assert forced and all(len(new) > lag - 5 for _, new in forced)  # at its newest checkpoint (every 5th)
    hd.settle()
    seen = [step for _, new in Seen.calls for step in new]
    assert seen == list(range(len(seen))) and seen[-1] >= 195  # every step in exactly one judged window
    assert f"healthd_rank_checkpoints_shed_total {float(shed)}" in generate_latest(hd.registry).decode()


def test_the_queue_forgets_an_expired_job_after_judging_its_last_steps() -> None:
    Seen.calls = []
    now = [0.0]
    hd = build(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1e-6, "dense_checkpoint_steps": 0},
                                      "store": {"job_ttl_seconds": 60}}),
               rules=[Seen], clock=lambda: now[0])
    _starved(hd)
    hd.ingest(_body(0, 0, 3))
    now[0] = 1000.0
    hd.tick()
    assert Seen.calls == [(0, [0]), (0, [1, 2])]
    assert len(hd.queue) == 0


def test_metrics_show_the_wait_until_the_queue_is_settled() -> None:
    Seen.calls = []
    app = create_app(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1e-6, "dense_checkpoint_steps": 0}}),
                     rules=[Seen])
    hd: Healthd = app.state.healthd
    _starved(hd)
    with TestClient(app) as client:
        _starved(hd)
        assert client.post("/v1/reports", content=_body(0, 0, 10, nan_at=9)).status_code == 200
        assert client.post("/v1/reports", content=_body(1, 0, 4)).status_code == 200
        health = client.get("/healthz").json()
        assert health["rank_evaluations_pending"] == 1 and health["rank_evaluation_delay_seconds"] >= 0
        assert health["rank_checkpoints_shed_total"] == 0
        metrics = client.get("/metrics").text
        assert "healthd_rank_evaluations_pending 1.0" in metrics
        assert "healthd_rank_evaluation_delay_seconds " in metrics
        alerts = client.get("/v1/alerts", params={"job": "j"}).json()["alerts"]
        assert [a["step"] for a in alerts] == [9]  # the NaN, evaluated at once; rank 1 still waits
        assert client.portal is not None
        client.portal.call(hd.settle)  # on the event loop, as the sweeper would once budget is back
        assert (1, [0]) in Seen.calls and len(hd.queue) == 0
        assert "healthd_rank_evaluations_pending 0.0" in client.get("/metrics").text


def test_a_rank_that_waited_past_the_lag_is_judged_at_its_newest_checkpoint_only() -> None:
    q = EvaluationQueue(share=1.0, burst_seconds=1.0)
    q.observe(("j", 0, None), 100.0, 20, _steps(*range(20)), every=5)  # totals 1, 6, 11, 16
    assert q.shed_stale(("j", 0, None), 105.0, max_seconds=10.0) == 0  # not behind yet
    assert q.shed_stale(("j", 0, None), 111.0, max_seconds=10.0) == 3
    assert q.take(("j", 0, None)) == [(16, 16)]  # one evaluation covering every step since the last judged


def test_the_sweeper_sheds_what_waited_too_long_and_settle_never_does() -> None:
    now = [0.0]
    hd = build(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1e-6, "max_checkpoint_lag_seconds": 10,
                                                 "dense_checkpoint_steps": 0}}),
               rules=[Seen], clock=lambda: now[0])
    Seen.calls = []
    _starved(hd)
    hd.ingest(_body(0, 0, 20))
    hd.ingest(_body(1, 0, 20))
    now[0] = 30.0
    hd.queue.share, hd.queue.burst_seconds = 1.0, 1.0  # the budget is back: the sweeper runs
    hd.evaluate_due()
    assert Seen.calls == [(0, list(range(16))), (1, list(range(16)))] and hd.queue.shed_total == 6
    Seen.calls = []
    hd.queue.share = 1e-6
    _starved(hd)
    hd.ingest(_body(0, 20, 20))
    now[0] = 60.0
    hd.settle()  # shutdown and tests: everything, on its own window
    assert [c[1][-1] for c in Seen.calls] == [20, 25, 30, 35] and hd.queue.shed_total == 6
