"""healthd pushes alerts to a real Alertmanager: labels, annotations, resolution, and an outage."""

from __future__ import annotations

import json
from typing import Any

from healthd.server.embedded import free_port
from healthd.settings import Settings
from tests.integration.servers import Alertmanager, alertmanager, wait_until
from tests.live import live_healthd

JOB = "am-push"


def _batch(*reports: dict[str, Any]) -> bytes:
    return json.dumps({"schema_version": 1, "reports": list(reports)}).encode()


def _step(i: int, **kw: Any) -> dict[str, Any]:
    return {"kind": "step", "job": JOB, "rank": 1, "time": 1.0, "step": i, "loss": 1.0, "grad_norm": 1.0,
            "lr": [0.1], **kw}


def _settings(am_url: str) -> Settings:
    return Settings.from_mapping({
        "public_url": "http://healthd.example:9184",
        "alertmanager": {"url": am_url, "resend_seconds": 1.0, "max_backoff_seconds": 1.0},
        "rules": {"NonFiniteValues": {"resolve_after_steps": 2}},
    })


def _is_resolved(a: dict[str, Any]) -> bool:
    return bool(a["status"]["state"] == "resolved" or not a["status"]["state"])


def test_firing_alert_reaches_alertmanager_with_labels_and_annotations_then_resolves(
        alertmanager_server: Alertmanager) -> None:
    am = alertmanager_server
    with live_healthd(_settings(am.url)) as hd:
        assert hd.post("/v1/reports", content=_batch(_step(0), _step(1, loss=float("nan")))).status_code == 200
        alert = am.wait_for_alert(lambda a: a["status"]["state"] == "active", what="NonFiniteValues active",
                                  alertname="NonFiniteValues")
        assert alert["labels"] == {"alertname": "NonFiniteValues", "severity": "critical", "job": JOB, "rank": "1"}
        ann = alert["annotations"]
        assert "step 1" in ann["summary"] and "step=1" in ann["description"]
        assert "learning rate" in ann["advice"].lower()
        assert ann["healthd_url"] == f"http://healthd.example:9184/v1/alerts?job={JOB}"
        assert alert["generatorURL"] == ann["healthd_url"]

        # Two clean steps resolve it (cool-down 2); Alertmanager then drops it from the active list.
        hd.post("/v1/reports", content=_batch(_step(2), _step(3)))
        wait_until(lambda: not am.alerts(alertname="NonFiniteValues", active_only=True) or None, timeout_seconds=30,
                   what="alert resolved in Alertmanager", log=am.log_tail)
        assert hd.app.state.alertmanager.pending() == 0


def test_alertmanager_down_delays_but_does_not_lose_alerts() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with live_healthd(_settings(url)) as hd:
        # Alertmanager is not there yet: the alert fires and resolves while it is down.
        hd.post("/v1/reports", content=_batch(_step(0), _step(1, loss=float("nan"))))
        hd.post("/v1/reports", content=_batch(_step(2, rank=2, loss=float("inf"))))
        hd.post("/v1/reports", content=_batch(_step(3), _step(4)))  # rank 1 resolves, rank 2 keeps firing
        pusher = hd.app.state.alertmanager
        wait_until(lambda: pusher.failed_total >= 1, what="a failed push while Alertmanager is down")
        assert pusher.pending() == 2  # one firing (rank 2), one resolved (rank 1), both kept

        with alertmanager(port=port) as am:
            firing = am.wait_for_alert(lambda a: a["labels"].get("rank") == "2", what="rank 2 alert delivered",
                                       alertname="NonFiniteValues")
            assert firing["status"]["state"] == "active"
            wait_until(lambda: pusher.pending() == 1, what="resolved alert acknowledged")
            # The resolved one was delivered with its endsAt: Alertmanager does not list it as active.
            assert [a["labels"].get("rank") for a in am.alerts(alertname="NonFiniteValues", active_only=True)] == ["2"]

