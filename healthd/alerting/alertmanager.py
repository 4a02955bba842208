"""Push healthd's alerts to Alertmanager (v2 API, ``POST /api/v2/alerts``).

``AlertmanagerPusher`` is an engine ``AlertListener``: a transition only
records the alert and wakes a background sender thread, so the event loop that
ingests reports never waits on Alertmanager. The sender posts every firing
alert (``endsAt`` = now + 4 x ``resend_seconds``, so an alert from a healthd
that died expires on its own) and every resolved one not yet acknowledged
(``endsAt`` = when it resolved). Firing alerts are re-sent every
``resend_seconds``, well before they expire. While Alertmanager is down the
sender retries with exponential backoff and keeps everything: a resolved
alert leaves the outbox only after a 2xx, so an outage delays, never loses.

Labels (what users route on): ``alertname`` (the rule), ``severity``,
``job``, ``rank`` when the alert is about one rank, ``stream`` when it is about a named stream
(``attach(stream=...)``). Annotations: ``summary``,
``description`` (the evidence), ``advice``, ``healthd_url`` (a link back to
the job's alerts), and once it fired ``incident`` (the id of the incident's root
alert) and ``caused_by`` (the likely cause's alertname, when another alert of
the job explains this one; ``healthd.engine.incidents``). These two are
annotations, not labels: an alert's label set is its identity in Alertmanager
and must not change when its cause starts firing. Alertmanager mutes the
consequences with the generated ``inhibit_rules`` (deploy/alertmanager/).
``generatorURL`` is the same link.

What does not live here: when alerts fire (engine, rules).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from healthd.engine.alerts import Alert
from healthd.settings import AlertmanagerSettings
from healthd.wire.schema import AlertState

log = logging.getLogger(__name__)

AlertKey = tuple[str, str, int | None, str | None]  # (job, rule, rank, stream)
EXPIRY_FACTOR = 4  # endsAt of a firing alert, in resend periods ahead (Prometheus uses a similar margin)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _value(v: object) -> str:
    if isinstance(v, float):
        return repr(v) if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def alert_labels(alert: Alert) -> dict[str, str]:
    """The label set healthd sends for an alert (and the Prometheus rules reproduce)."""
    labels = {"alertname": alert.rule, "severity": alert.severity.value, "job": alert.job}
    if alert.rank is not None:
        labels["rank"] = str(alert.rank)
    if alert.stream is not None:  # absent for a job's unnamed stream: its alerts keep their identity
        labels["stream"] = alert.stream
    return labels


def alert_payload(alert: Alert, *, base_url: str, now: float, resend_seconds: float) -> dict[str, Any]:
    """One alert in Alertmanager's v2 ``postableAlert`` shape."""
    link = f"{base_url.rstrip('/')}/v1/alerts?job={quote(alert.job, safe='')}"
    evidence = ", ".join(f"{k}={_value(v)}" for k, v in alert.evidence.items() if v is not None)
    resolved = alert.state is AlertState.RESOLVED
    ends = (alert.resolved_at or now) if resolved else now + EXPIRY_FACTOR * resend_seconds
    annotations = {
        "summary": alert.summary,
        "description": evidence or alert.summary,
        "advice": alert.advice,
        "healthd_url": link,
    }
    if alert.incident is not None:
        annotations["incident"] = alert.incident
    if alert.caused_by is not None:
        annotations["caused_by"] = alert.caused_by
    return {
        "labels": alert_labels(alert),
        "annotations": annotations,
        "startsAt": _iso(alert.fired_at or alert.started_at),
        "endsAt": _iso(ends),
        "generatorURL": link,
    }


class AlertmanagerPusher:
    """Engine listener plus background sender; ``start()``/``stop()`` bracket its thread."""

    def __init__(self, settings: AlertmanagerSettings, *, base_url: str,
                 client: httpx.Client | None = None, clock: Callable[[], float] = time.time,
                 max_resolved_kept: int = 100_000) -> None:
        if not settings.url:
            raise ValueError("alertmanager.url is required to push alerts")
        self.settings = settings
        self.base_url = base_url
        self.endpoint = settings.url.rstrip("/") + "/api/v2/alerts"
        self.clock = clock
        self.max_resolved_kept = max_resolved_kept
        self._client = client or httpx.Client(timeout=settings.timeout_seconds)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._firing: dict[AlertKey, Alert] = {}
        self._resolved: dict[AlertKey, dict[str, Any]] = {}  # payload, until Alertmanager acknowledged it
        self.sent_total = 0
        self.failed_total = 0
        self.dropped_total = 0  # resolved alerts dropped because the outbox was full (never in practice)

    # ------------------------------------------------------------- engine side (event loop)
    def on_transition(self, alert: Alert, previous: AlertState) -> None:
        key = (alert.job, alert.rule, alert.rank, alert.stream)
        with self._lock:
            if alert.state is AlertState.FIRING:
                self._firing[key] = alert
                self._resolved.pop(key, None)
            elif alert.state is AlertState.RESOLVED:
                self._firing.pop(key, None)
                if len(self._resolved) >= self.max_resolved_kept:
                    self._resolved.pop(next(iter(self._resolved)))
                    self.dropped_total += 1
                self._resolved[key] = alert_payload(alert, base_url=self.base_url, now=self.clock(),
                                                    resend_seconds=self.settings.resend_seconds)
        self._wake.set()

    def forget(self, job: str) -> None:
        """Stop re-sending a forgotten job's firing alerts (they expire in Alertmanager at their endsAt)."""
        with self._lock:
            for key in [k for k in self._firing if k[0] == job]:
                del self._firing[key]

    # ------------------------------------------------------------- sender
    def pending(self) -> int:
        """Alerts waiting to be (re-)sent: firing plus unacknowledged resolved ones."""
        with self._lock:
            return len(self._firing) + len(self._resolved)

    def flush(self) -> bool:
        """Send everything now; True when Alertmanager acknowledged it (or there was nothing to send)."""
        now = self.clock()
        with self._lock:
            firing = [alert_payload(a, base_url=self.base_url, now=now, resend_seconds=self.settings.resend_seconds)
                      for a in self._firing.values()]
            resolved = dict(self._resolved)
        if not firing and not resolved:
            return True
        try:
            r = self._client.post(self.endpoint, json=[*firing, *resolved.values()])
            r.raise_for_status()
        except httpx.HTTPError as e:
            self.failed_total += 1
            log.warning("alertmanager push to %s failed (%d alerts kept for retry): %s",
                        self.endpoint, len(firing) + len(resolved), e)
            return False
        self.sent_total += len(firing) + len(resolved)
        with self._lock:
            for key, payload in resolved.items():
                if self._resolved.get(key) is payload:
                    del self._resolved[key]
        return True

    def _run(self) -> None:
        backoff = 0.5
        next_due = 0.0
        while not self._stop.is_set():
            self._wake.wait(timeout=max(0.0, next_due - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            if self.flush():
                backoff = 0.5
                next_due = time.monotonic() + self.settings.resend_seconds
            else:
                next_due = time.monotonic() + backoff
                backoff = min(backoff * 2, self.settings.max_backoff_seconds)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="healthd-alertmanager", daemon=True)
            self._thread.start()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop the sender after one last flush attempt (resolved alerts go out on shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_seconds)
            self._thread = None
        self.flush()
        self._client.close()
