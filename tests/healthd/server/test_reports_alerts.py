"""The report push's answer tells the job what fires (``IngestResult.alerts``), against a real server."""

from __future__ import annotations

import json
from typing import Any

from tests.live import LiveHealthd


def _push(live: LiveHealthd, reports: list[dict[str, Any]]) -> tuple[int, dict[str, Any], bytes]:
    r = live.post("/v1/reports", content=json.dumps({"schema_version": 1, "reports": reports}).encode())
    return r.status_code, r.json(), r.content


def _step(step: int, loss: float, job: str = "j", rank: int = 0) -> dict[str, Any]:
    return {"kind": "step", "job": job, "rank": rank, "time": 1.0 + step, "step": step, "loss": loss}


def test_a_clean_job_gets_an_empty_list_and_a_nan_gets_its_alert_back(healthd_server: LiveHealthd) -> None:
    status, answer, clean_body = _push(healthd_server, [_step(i, 2.0) for i in range(3)])
    assert (status, answer) == (200, {"accepted": 3, "rejected": []})  # nothing fires: the answer as before

    status, answer, _ = _push(healthd_server, [_step(3, 2.0), _step(4, float("nan"))])
    assert status == 200
    [alert] = answer["alerts"]
    assert (alert["rule"], alert["severity"], alert["job"], alert["rank"], alert["step"]) == (
        "NonFiniteValues", "critical", "j", 0, 4)
    assert "Non-finite" in alert["summary"] and alert["evidence"]["nonfinite_loss"] == 0

    # Not the cached body for 3 accepted reports: the job is still firing, and is still told so.
    status, answer, body = _push(healthd_server, [_step(5 + i, float("nan")) for i in range(3)])
    assert [a["rule"] for a in answer["alerts"]] == ["NonFiniteValues"] and body != clean_body


def test_other_jobs_are_not_told_and_resolved_alerts_are_not_served_stale(healthd_server: LiveHealthd) -> None:
    _push(healthd_server, [_step(0, float("nan"))])
    status, answer, _ = _push(healthd_server, [_step(0, 1.0, job="other")])
    assert (status, answer) == (200, {"accepted": 1, "rejected": []})
    # Heartbeats of the sick job carry it too (a rank that stopped stepping is still told).
    _, answer, _ = _push(healthd_server, [{"kind": "heartbeat", "job": "j", "rank": 3, "time": 2.0}])
    assert [a["rule"] for a in answer["alerts"]] == ["NonFiniteValues"]
    # NonFiniteValues resolves after 50 clean steps; then the answer is the plain cached one again.
    healthy = [_step(1 + i, 2.0 / (1 + 0.05 * i) + 0.02 * (i % 3)) for i in range(61)]  # a loss that falls
    _, answer, _ = _push(healthd_server, healthy[:60])
    assert "alerts" not in answer
    _, answer, _ = _push(healthd_server, healthy[60:])
    assert answer == {"accepted": 1, "rejected": []}


def test_a_partly_rejected_batch_is_told_too(healthd_server: LiveHealthd) -> None:
    status, answer, _ = _push(healthd_server, [_step(0, float("nan")), {"kind": "step", "job": "j"}])
    assert status == 422 and answer["accepted"] == 1
    assert [a["rule"] for a in answer["alerts"]] == ["NonFiniteValues"]
