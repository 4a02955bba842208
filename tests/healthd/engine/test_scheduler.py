"""healthd.engine.scheduler: rank rules within a CPU budget; no step unseen, NaN at once, the wait exported."""

from __future__ import annotations

import json
import math
from typing import ClassVar

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


def test_queue_is_oldest_first_and_counts_steps_per_rank() -> None:
    q = EvaluationQueue(share=1.0, burst_seconds=1.0)
    assert q.add(("j", 1), 10.0) == 1
    assert q.add(("j", 0), 11.0) == 1
    assert q.add(("j", 1), 12.0) == 2  # keeps its place and its oldest arrival
    assert q.add(("k", 0), 13.0) == 1
    assert q.keys() == [("j", 1), ("j", 0), ("k", 0)] and q.keys("k") == [("k", 0)]
    assert q.oldest() == ("j", 1) and q.oldest_since() == 10.0
    assert q.take(("j", 1)) == 2 and q.take(("j", 1)) == 0
    q.drop_job("j")
    assert q.keys() == [("k", 0)] and len(q) == 1


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
    return build(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1e-6, "max_steps_per_evaluation": 5}}),
                 rules=[Seen])


def test_without_budget_ranks_wait_and_their_next_evaluation_covers_every_step() -> None:
    hd = _healthd()
    _starved(hd)
    hd.ingest(_body(0, 0, 10))
    hd.ingest(_body(1, 0, 10))
    hd.ingest(_body(0, 10, 10))
    assert Seen.calls == [] and hd.queue.keys() == [("j", 0, None), ("j", 1, None)]
    hd.settle()
    assert Seen.calls == [(0, list(range(20))), (1, list(range(10)))]  # oldest first; no step unseen
    assert len(hd.queue) == 0


def test_a_nan_is_evaluated_at_once_whatever_the_budget() -> None:
    hd = _healthd()
    _starved(hd)
    hd.ingest(_body(0, 0, 10, nan_at=6))
    (alert,) = hd.engine.firing()
    assert alert.step == 6 and Seen.calls == [(0, list(range(7)))]
    assert hd.queue.keys() == [("j", 0, None)]  # steps 7-9 wait for the budget


def test_an_infinite_gradient_norm_is_evaluated_at_once_too() -> None:
    hd = _healthd()
    _starved(hd)
    reports = [{"kind": "step", "job": "j", "rank": 0, "time": 1.0, "step": s, "loss": 1.0,
                "grad_norm": math.inf if s == 3 else 1.0} for s in range(6)]
    hd.ingest(json.dumps({"schema_version": 1, "reports": reports}, allow_nan=True).encode())
    assert Seen.calls == [(0, [0, 1, 2, 3])]  # the rule's own test; no budget needed
    assert hd.queue.keys() == [("j", 0, None)]


def test_with_budget_a_request_is_evaluated_before_it_is_answered() -> None:
    hd = build(Settings(), rules=[Seen])  # defaults: a share of the core and a burst
    Seen.calls = []
    hd.ingest(_body(0, 0, 7))
    assert Seen.calls == [(0, [0, 1, 2, 3, 4]), (0, [5, 6])] and len(hd.queue) == 0


def test_the_queue_forgets_an_expired_job() -> None:
    now = [0.0]
    hd = build(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1e-6}, "store": {"job_ttl_seconds": 60}}),
               rules=[Seen], clock=lambda: now[0])
    _starved(hd)
    hd.ingest(_body(0, 0, 3))
    now[0] = 1000.0
    hd.tick()
    assert len(hd.queue) == 0


def test_metrics_show_the_wait_until_the_queue_is_settled() -> None:
    Seen.calls = []
    app = create_app(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1e-6}}), rules=[Seen])
    hd: Healthd = app.state.healthd
    _starved(hd)
    with TestClient(app) as client:
        _starved(hd)
        assert client.post("/v1/reports", content=_body(0, 0, 10, nan_at=9)).status_code == 200
        assert client.post("/v1/reports", content=_body(1, 0, 4)).status_code == 200
        health = client.get("/healthz").json()
        assert health["rank_evaluations_pending"] == 1 and health["rank_evaluation_delay_seconds"] >= 0
        metrics = client.get("/metrics").text
        assert "healthd_rank_evaluations_pending 1.0" in metrics
        assert "healthd_rank_evaluation_delay_seconds " in metrics
        alerts = client.get("/v1/alerts", params={"job": "j"}).json()["alerts"]
        assert [a["step"] for a in alerts] == [9]  # the NaN, evaluated at once; rank 1 still waits
        assert client.portal is not None
        client.portal.call(hd.settle)  # on the event loop, as the sweeper would once budget is back
        assert (1, [0, 1, 2, 3]) in Seen.calls and len(hd.queue) == 0
        assert "healthd_rank_evaluations_pending 0.0" in client.get("/metrics").text
