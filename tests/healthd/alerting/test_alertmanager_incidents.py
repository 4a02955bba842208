"""The Alertmanager push carries an alert's incident as annotations; its labels (its identity) do not change."""

from __future__ import annotations

from healthd.alerting.alertmanager import alert_payload
from healthd.engine.alerts import Alert
from healthd.wire.schema import AlertState, Severity


def _alert(caused_by: str | None, incident: str | None) -> Alert:
    return Alert(id="d", rule="DeadActivations", severity=Severity.WARNING, state=AlertState.FIRING, job="j", rank=0,
                 layer=None, step=5, last_step=5, summary="dead", evidence={}, advice="", started_at=1.0,
                 updated_at=1.0, fired_at=1.0, caused_by=caused_by, incident=incident)


def _payload(alert: Alert) -> dict[str, object]:
    return alert_payload(alert, base_url="http://h", now=2.0, expiry_seconds=4.0)


def test_consequence_carries_cause_and_incident_as_annotations_only() -> None:
    p = _payload(_alert("LearningRateTooHigh", "abc"))
    assert p["labels"] == {"alertname": "DeadActivations", "severity": "warning", "job": "j", "rank": "0"}
    annotations = p["annotations"]
    assert isinstance(annotations, dict)
    assert annotations["caused_by"] == "LearningRateTooHigh" and annotations["incident"] == "abc"


def test_root_alert_has_its_incident_and_no_cause() -> None:
    annotations = _payload(_alert(None, "d"))["annotations"]
    assert isinstance(annotations, dict) and annotations["incident"] == "d" and "caused_by" not in annotations
    assert _payload(_alert(None, None))["labels"] == _payload(_alert("LearningRateTooHigh", "abc"))["labels"]
