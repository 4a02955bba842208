"""Pushing to several Alertmanagers (the peers of a cluster): each gets every alert, independently.

The HTTP side is an ``httpx.MockTransport``; the real two-node cluster is in
tests/integration/test_ha_alertmanager.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from healthd.alerting.alertmanager import AlertmanagerPusher
from healthd.engine.alerts import Alert
from healthd.settings import AlertmanagerSettings, ConfigError, Settings
from healthd.wire.schema import AlertState, Severity

A, B = "http://am-a:9093", "http://am-b:9093"


def _alert(state: AlertState, rank: int = 0) -> Alert:
    return Alert(id=f"a{rank}", rule="NonFiniteValues", severity=Severity.CRITICAL, state=state, job="j", rank=rank,
                 layer=None, step=5, last_step=5, summary="nan", evidence={}, advice="", started_at=1.0,
                 updated_at=1.0, fired_at=1.0, resolved_at=2.0 if state is AlertState.RESOLVED else None)


class _Peers:
    """Answers as Alertmanagers at A and B; a peer can be down (connection refused) or stalled."""

    def __init__(self) -> None:
        self.received: dict[str, list[dict[str, Any]]] = {A: [], B: []}
        self.down: set[str] = set()
        self.stalled = threading.Event()  # set: B's requests wait until released
        self.release = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        peer = f"http://{request.url.host}:{request.url.port}"
        assert request.url.path == "/api/v2/alerts"
        if peer in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if peer == B and self.stalled.is_set():
            self.release.wait(timeout=30)
        with self.lock:
            self.received[peer].extend(json.loads(request.content))
        return httpx.Response(200)


def _pusher(peers: _Peers, **settings: object) -> AlertmanagerPusher:
    s = AlertmanagerSettings.model_validate({"url": A, "urls": [B], "resend_seconds": 60.0,
                                             "max_backoff_seconds": 0.2, **settings})
    return AlertmanagerPusher(s, base_url="http://h", client=httpx.Client(transport=httpx.MockTransport(peers)))


def _wait(cond: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_targets_are_url_then_urls_each_once() -> None:
    assert AlertmanagerSettings(url=A).targets == [A]  # the single-URL setting as before
    assert AlertmanagerSettings(url=A + "/", urls=(B, A)).targets == [A, B]
    assert AlertmanagerSettings(urls=(B,)).targets == [B]
    assert AlertmanagerSettings().targets == []
    assert Settings.from_mapping({"alertmanager": {"urls": [A, B]}}).alertmanager.targets == [A, B]
    with pytest.raises(ConfigError, match="alertmanager.urls"):
        Settings.from_mapping({"alertmanager": {"urls": A}})
    with pytest.raises(ValueError, match="alertmanager.url"):
        AlertmanagerPusher(AlertmanagerSettings(), base_url="http://h")


def test_every_peer_gets_every_alert() -> None:
    peers = _Peers()
    pusher = _pusher(peers)
    pusher.on_transition(_alert(AlertState.FIRING, rank=1), AlertState.PENDING)
    pusher.on_transition(_alert(AlertState.RESOLVED, rank=2), AlertState.FIRING)
    assert pusher.flush()
    for peer in (A, B):
        # firing: endsAt ahead of now; resolved: endsAt = when it resolved (1970 here)
        assert sorted((a["labels"]["rank"], a["endsAt"] > "2000") for a in peers.received[peer]) == [
            ("1", True), ("2", False)]
    assert pusher.pending() == 1  # the firing one, re-sent every resend_seconds; the resolved one acknowledged by both
    assert pusher.sent_total == 4


def test_a_down_peer_keeps_its_own_outbox_and_the_other_is_acknowledged() -> None:
    peers = _Peers()
    peers.down.add(B)
    pusher = _pusher(peers)
    pusher.on_transition(_alert(AlertState.RESOLVED, rank=2), AlertState.FIRING)
    assert not pusher.flush()
    assert [a["labels"]["rank"] for a in peers.received[A]] == ["2"]
    assert pusher.pending() == 1 and pusher.failed_total == 1  # kept for B only
    assert not pusher.flush() and len(peers.received[A]) == 1  # A is not sent it again while B stays down
    peers.down.clear()
    assert pusher.flush()
    assert [a["labels"]["rank"] for a in peers.received[B]] == ["2"]
    assert pusher.pending() == 0


def test_a_stalled_peer_does_not_delay_the_other() -> None:
    peers = _Peers()
    peers.stalled.set()
    pusher = _pusher(peers)
    pusher.start()
    try:
        pusher.on_transition(_alert(AlertState.FIRING), AlertState.PENDING)
        # B's sender is stuck inside its request; A's sender delivers regardless.
        _wait(lambda: peers.received[A], "A to receive the alert while B stalls")
        assert not peers.received[B]
    finally:
        peers.release.set()
        pusher.stop()
    assert peers.received[B]


def test_restored_firing_alerts_are_sent_to_every_peer() -> None:
    peers = _Peers()
    pusher = _pusher(peers)
    pusher.restore([_alert(AlertState.FIRING, rank=1), _alert(AlertState.RESOLVED, rank=2)])
    assert pusher.pending() == 1  # the resolved one is history, not re-sent
    assert pusher.flush()
    for peer in (A, B):
        assert [a["labels"]["rank"] for a in peers.received[peer]] == ["1"]
