"""Reads never mutate: with rank evaluations still queued, no GET route runs a rule, changes the store,
the evaluation queue or alert state, or calls an alert listener (Alertmanager push, SQLite).

The app is driven without its lifespan, so no background loop (sweeper, ticker) runs: whatever
changed would have been changed by the read itself. ``/metrics`` is the scrape path's own test
(``tests/healthd/exposition``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import pytest
from starlette.testclient import TestClient

from healthd.engine.alerts import Alert
from healthd.rules.non_finite_values import NonFiniteValues
from healthd.server.app import create_app
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.wire.schema import AlertState

READS = ["/v1/alerts", "/v1/alerts?job=j&state=firing", "/v1/jobs", "/v1/jobs/j", "/v1/jobs/j/series",
         "/", "/healthz", "/openapi.json"]


class Heard:
    """An alert listener that records every transition it hears."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, AlertState]] = []

    def on_transition(self, alert: Alert, previous: AlertState) -> None:
        self.calls.append((alert.id, alert.state))


def _body(rank: int, steps: range, nan_at: int | None = None) -> bytes:
    reports = [{"kind": "step", "job": "j", "rank": rank, "time": 1.0, "step": s,
                "loss": math.nan if s == nan_at else 1.0} for s in steps]
    return json.dumps({"schema_version": 1, "reports": reports}, allow_nan=True).encode()


def _state(hd: Healthd) -> tuple[bytes, list[tuple[tuple[str, int], int]], list[dict[str, object]], int]:
    """Everything a read could change: the store (whole), the queue, alert state, evaluations run."""
    return (pickle.dumps(hd.store), [(k, hd.queue.waiting(k)) for k in hd.queue.keys()],
            [dataclasses.asdict(a) for a in hd.engine.alerts()], hd.engine.evaluation_count)


@pytest.fixture
def queued() -> tuple[TestClient, Healthd, Heard]:
    """A firing NaN alert on rank 0 whose clean steps after it wait in the queue (their evaluation
    would resolve it: ``resolve_after_steps=1``), and rank 1's steps waiting too."""
    heard = Heard()
    settings = Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1e-6, "rank_rules_burst_seconds": 1e-9},
                                      "rules": {"NonFiniteValues": {"resolve_after_steps": 1}}})
    hd = build(settings, rules=[NonFiniteValues], listeners=[heard])
    hd.queue.charge(1e6)  # the budget spent: at a share of 1e-6 it stays spent for the test
    client = TestClient(create_app(settings, hd=hd))  # no `with`: no lifespan, no background loop
    assert client.post("/v1/reports", content=_body(0, range(4), nan_at=3)).status_code == 200
    assert client.post("/v1/reports", content=_body(0, range(4, 9))).status_code == 200
    assert client.post("/v1/reports", content=_body(1, range(5))).status_code == 200
    assert [a.step for a in hd.engine.firing()] == [3] and len(heard.calls) == 1  # a NaN is evaluated at once
    assert hd.queue.keys() == [("j", 0, None), ("j", 1, None)]
    heard.calls.clear()
    return client, hd, heard


@pytest.mark.parametrize("path", READS)
def test_a_read_changes_nothing_while_evaluations_wait(queued: tuple[TestClient, Healthd, Heard], path: str) -> None:
    client, hd, heard = queued
    before = _state(hd)
    assert client.get(path).status_code == 200
    assert _state(hd) == before and heard.calls == []


def test_reads_answer_from_the_state_as_it_is(queued: tuple[TestClient, Healthd, Heard]) -> None:
    client, hd, heard = queued
    (alert,) = client.get("/v1/alerts", params={"job": "j"}).json()["alerts"]
    assert alert["state"] == "firing"  # its resolving steps not evaluated yet
    health = client.get("/healthz").json()
    assert health["rank_evaluations_pending"] == 2
    assert client.get("/v1/jobs/j").json()["last_step"] == 8  # the store has every accepted step
    hd.settle()  # what the sweeper does once the budget allows: now the alert resolves, and is heard
    assert [a["state"] for a in client.get("/v1/alerts", params={"job": "j"}).json()["alerts"]] == ["resolved"]
    assert heard.calls == [(alert["id"], AlertState.RESOLVED)]
