"""Alert state survives ``kill -9`` and SIGTERM of a real ``healthd serve --db`` subprocess."""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from healthd.exposition import catalog as C
from tests.integration.healthd_process import HealthdProcess

pytestmark = pytest.mark.integration


def _post(hd: HealthdProcess, *reports: dict) -> httpx.Response:
    body = json.dumps({"schema_version": 1, "reports": list(reports)})
    return httpx.post(hd.url + "/v1/reports", content=body, timeout=10)


def _step(job: str, i: int, loss: float = 1.0, **kw: object) -> dict:
    nf = {"loss": 1} if math.isnan(loss) else {}
    return {"kind": "step", "job": job, "rank": 0, "time": 1.0, "step": i, "loss": loss, "grad_norm": 1.0,
            "lr": [0.01], "update_ratio": 1e-3, "nonfinite": nf, **kw}


def _alerts(hd: HealthdProcess) -> list[dict]:
    return httpx.get(hd.url + "/v1/alerts", timeout=10).json()["alerts"]


def _transitions(hd: HealthdProcess) -> dict[str, float]:
    text = httpx.get(hd.url + "/metrics", timeout=10).text
    return {s.labels["state"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == C.ALERT_TRANSITIONS_TOTAL.name}


def _wait_committed(hd: HealthdProcess, expected: dict[str, str]) -> None:
    """Until the database holds ``expected`` (job -> state): alert writes are committed by healthd's
    writer thread shortly after the request that caused them, and kill -9 loses what is not yet."""
    deadline = time.monotonic() + 15
    while True:
        with contextlib.closing(sqlite3.connect(hd.db)) as db:
            rows = dict(db.execute("SELECT job, state FROM alerts").fetchall())
        if rows == expected:
            return
        assert time.monotonic() < deadline, f"alert database holds {rows}, not {expected}"
        time.sleep(0.05)


@pytest.fixture
def hd(tmp_path: Path) -> Iterator[HealthdProcess]:
    proc = HealthdProcess(tmp_path)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_kill9_keeps_firing_alerts_and_history_without_renotifying(hd: HealthdProcess) -> None:
    # Job "a": a NaN fires, 60 healthy steps resolve it (NonFiniteValues resolves after 50). Job "b": stays firing.
    # Healthy means a falling loss: a flat one is a LossPlateau, which the NaN's incident would adopt and hold open.
    _post(hd, *[_step("a", i, 1 / (1 + 0.05 * i)) for i in range(10)], _step("a", 10, math.nan),
          *[_step("a", i, 1 / (1 + 0.05 * i)) for i in range(11, 71)])
    _post(hd, *[_step("b", i) for i in range(10)], _step("b", 10, math.nan))
    before = {(a["job"], a["rule"]): a for a in _alerts(hd)}
    assert before[("a", "NonFiniteValues")]["state"] == "resolved"
    assert before[("b", "NonFiniteValues")]["state"] == "firing"
    _wait_committed(hd, {"a": "resolved", "b": "firing"})

    hd.kill9()
    hd.start()

    after = {(a["job"], a["rule"]): a for a in _alerts(hd)}
    assert after[("a", "NonFiniteValues")] == before[("a", "NonFiniteValues")]
    assert after[("b", "NonFiniteValues")]["id"] == before[("b", "NonFiniteValues")]["id"]
    assert after[("b", "NonFiniteValues")]["state"] == "firing"
    assert _transitions(hd) == {"pending": 0, "firing": 0, "resolved": 0}  # nothing re-notified

    # The job goes on after the restart with empty windows: healthy steps raise nothing new
    # (rules warm up again), the restored alert keeps its identity and resolves normally.
    assert _post(hd, *[_step("b", i, 1.0 - 0.001 * i) for i in range(11, 40)]).status_code == 200
    now = {(a["job"], a["rule"]): a for a in _alerts(hd)}
    assert set(now) == set(after)
    assert now[("b", "NonFiniteValues")]["state"] == "firing"
    _post(hd, *[_step("b", i, 1.0 - 0.001 * i) for i in range(40, 70)])
    resolved = [a for a in _alerts(hd) if a["job"] == "b"]
    assert [(a["state"], a["id"]) for a in resolved] == [("resolved", before[("b", "NonFiniteValues")]["id"])]
    assert _transitions(hd) == {"pending": 0, "firing": 0, "resolved": 1}


def test_sigterm_finishes_and_flushes_alert_state(hd: HealthdProcess) -> None:
    _post(hd, *[_step("c", i) for i in range(5)], _step("c", 5, math.nan))
    _post(hd, _step("c", 6), _step("c", 7))
    # healthd serve stops gracefully on SIGTERM: in-flight requests finish, the lifespan flushes, exit 0.
    assert hd.terminate() in (0, -15)
    with sqlite3.connect(hd.db) as db:
        rows = db.execute("SELECT state, body FROM alerts WHERE job = 'c'").fetchall()
    (state, body), = rows
    assert state == "firing"
    assert json.loads(body)["misses"] == 2  # state as of the last request, written at shutdown
    hd.start()
    (alert,) = _alerts(hd)
    assert alert["state"] == "firing" and alert["step"] == 5
