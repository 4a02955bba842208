"""How long a firing alert lives in Alertmanager without its sender, and what a silent job's shard stops sending.

``firing_expiry_seconds`` sets a firing alert's endsAt (so a dead shard's alert outlives the window the
shard that takes its jobs needs to fire it again); ``hold`` stops everything for a job handed over to
another shard, except the stalls. Flushes are called directly (no sender thread), the HTTP side is an
``httpx.MockTransport``; the real cluster and shards are in tests/integration/test_ha_alertmanager.py.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import httpx
import pytest

from healthd.alerting.alertmanager import AlertmanagerPusher
from healthd.engine.alerts import Alert
from healthd.rules import ALL_RULES
from healthd.settings import AlertmanagerSettings
from healthd.wire.schema import AlertState, Severity

NOW = 1_000_000.0


def _alert(rule: str, job: str, state: AlertState = AlertState.FIRING) -> Alert:
    return Alert(id=f"{job}-{rule}", rule=rule, severity=Severity.CRITICAL, state=state, job=job, rank=0,
                 layer=None, step=5, last_step=5, summary="s", evidence={}, advice="", started_at=NOW - 10,
                 updated_at=NOW, fired_at=NOW - 10, resolved_at=NOW if state is AlertState.RESOLVED else None)


class _Recorder:
    def __init__(self) -> None:
        self.posts: list[list[dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.posts.append(json.loads(request.content))
        return httpx.Response(200)

    def last(self) -> dict[tuple[str, str], str]:
        """(job, alertname) -> endsAt of the last post."""
        return {(a["labels"]["job"], a["labels"]["alertname"]): a["endsAt"] for a in self.posts[-1]} \
            if self.posts else {}


def _pusher(rec: _Recorder, **settings: object) -> AlertmanagerPusher:
    s = AlertmanagerSettings.model_validate({"url": "http://am:9093", **settings})
    return AlertmanagerPusher(s, base_url="http://h", client=httpx.Client(transport=httpx.MockTransport(rec)),
                              clock=lambda: NOW, silence_rules=[r.name for r in ALL_RULES if r.fires_on_silence])


def _ends_in(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() - NOW


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, 900.0),  # the default: a dead shard's alert outlives a window of 90 steps at 1 step / 10 s
    ({"firing_expiry_seconds": 120.0, "resend_seconds": 10.0}, 120.0),
    ({"firing_expiry_seconds": 10.0, "resend_seconds": 60.0}, 240.0),  # never under 4 resends: a failed push
])
def test_a_firing_alert_ends_firing_expiry_seconds_ahead_and_a_resolved_one_when_it_resolved(
        settings: dict[str, float], expected: float) -> None:
    rec = _Recorder()
    pusher = _pusher(rec, **settings)
    pusher.on_transition(_alert("NonFiniteValues", "j"), AlertState.PENDING)
    assert pusher.flush()
    assert _ends_in(rec.last()[("j", "NonFiniteValues")]) == pytest.approx(expected)
    pusher.on_transition(_alert("NonFiniteValues", "j", AlertState.RESOLVED), AlertState.FIRING)
    assert pusher.flush()
    assert _ends_in(rec.last()[("j", "NonFiniteValues")]) == pytest.approx(0.0)  # explicit: resolves at once


def test_the_stall_rules_are_the_ones_that_fire_on_silence() -> None:
    assert {r.name for r in ALL_RULES if r.fires_on_silence} == {"RankStalled", "TrainingStalled"}


def test_a_silent_job_is_no_longer_sent_but_its_stalls_are_and_it_is_sent_again_once_it_reports() -> None:
    rec = _Recorder()
    pusher = _pusher(rec)
    for alert in (_alert("VanishingGradients", "moved"), _alert("TrainingStalled", "moved"),
                  _alert("VanishingGradients", "here")):
        pusher.on_transition(alert, AlertState.PENDING)
    assert pusher.flush()
    assert set(rec.last()) == {("moved", "VanishingGradients"), ("moved", "TrainingStalled"),
                               ("here", "VanishingGradients")}

    pusher.hold(["moved"])  # the ticker: "moved" sent nothing for silent_job_seconds
    assert pusher.flush()
    assert set(rec.last()) == {("moved", "TrainingStalled"), ("here", "VanishingGradients")}

    # Resolved while held (e.g. forgotten at its TTL): not sent either, or it would resolve in
    # Alertmanager the alert that the shard which has the job now keeps firing.
    pusher.on_transition(_alert("VanishingGradients", "moved", AlertState.RESOLVED), AlertState.FIRING)
    assert pusher.pending() == 3 - 1
    pusher.on_transition(_alert("TrainingStalled", "moved", AlertState.RESOLVED), AlertState.FIRING)
    assert pusher.flush()
    assert _ends_in(rec.last()[("moved", "TrainingStalled")]) == pytest.approx(0.0)  # a stall's resolve is sent
    assert ("moved", "VanishingGradients") not in rec.last()


def test_a_held_job_that_reports_again_is_re_sent_at_the_next_push() -> None:
    rec = _Recorder()
    pusher = _pusher(rec)
    pusher.on_transition(_alert("LossPlateau", "j"), AlertState.PENDING)
    pusher.hold(["j"])
    assert pusher.flush()  # nothing to send is a success
    assert ("j", "LossPlateau") not in rec.last()
    pusher.hold([])
    assert pusher.flush()
    assert _ends_in(rec.last()[("j", "LossPlateau")]) == pytest.approx(900.0)
