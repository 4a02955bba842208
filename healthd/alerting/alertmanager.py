"""Push healthd's alerts to Alertmanager (v2 API, ``POST /api/v2/alerts``).

``AlertmanagerPusher`` is an engine ``AlertListener``: a transition only
records the alert and wakes a background sender thread, so the event loop that
ingests reports never waits on Alertmanager. The sender posts every firing
alert (``endsAt`` = now + ``firing_expiry_seconds``, at least 4 x ``resend_seconds``, so an
alert from a healthd that died expires on its own, but only after the shard that took its jobs
had time to fill its windows and fire it again) and every resolved one not yet acknowledged
(``endsAt`` = when it resolved). Firing alerts are re-sent every
``resend_seconds``, well before they expire. While Alertmanager is down the
sender retries with exponential backoff and keeps everything: a resolved
alert leaves the outbox only after a 2xx, so an outage delays, never loses.

Several Alertmanagers (``alertmanager.url`` plus ``alertmanager.urls``: the
peers of a cluster) each get every alert from their own sender thread, with
their own backoff and their own outbox of unacknowledged resolved alerts, as
Prometheus sends to each Alertmanager it lists: a peer that is down or slow
delays no other. Deduplicating the notifications is the cluster's job (its
peers gossip what they sent); healthd does not pick one peer.

A job silent past ``silent_job_seconds`` (``hold``: no report, not even a heartbeat) was handed over
to another shard, or is gone: nothing more is sent for it, firing or resolved, except the alerts of
rules that fire *because* it is silent (``Rule.fires_on_silence``: the stalls). Otherwise the
shard that had the job while its owner was down would keep re-opening in Alertmanager an alert
that the owner, back, resolved; its alerts lapse at the endsAt they have.

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
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from healthd.engine.alerts import Alert
from healthd.settings import MIN_EXPIRY_RESENDS, AlertmanagerSettings
from healthd.wire.schema import AlertState

log = logging.getLogger(__name__)

AlertKey = tuple[str, str, int | None, str | None]  # (job, rule, rank, stream)
EXPIRY_FACTOR = MIN_EXPIRY_RESENDS  # endsAt of a firing alert, at least this many resend periods ahead


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


def alert_payload(alert: Alert, *, base_url: str, now: float, expiry_seconds: float) -> dict[str, Any]:
    """One alert in Alertmanager's v2 ``postableAlert`` shape; a firing one ends ``expiry_seconds`` from
    ``now`` unless re-sent (``AlertmanagerSettings.expiry_seconds``)."""
    link = f"{base_url.rstrip('/')}/v1/alerts?job={quote(alert.job, safe='')}"
    evidence = ", ".join(f"{k}={_value(v)}" for k, v in alert.evidence.items() if v is not None)
    resolved = alert.state is AlertState.RESOLVED
    ends = (alert.resolved_at or now) if resolved else now + expiry_seconds
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


class _Target:
    """One Alertmanager: its endpoint, HTTP client, counters and outbox of resolved alerts it has not acknowledged."""

    def __init__(self, url: str, client: httpx.Client) -> None:
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.client = client
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.resolved: dict[AlertKey, dict[str, Any]] = {}  # payload, until this Alertmanager acknowledged it
        self.sent_total = 0
        self.failed_total = 0
        self.dropped_total = 0


class AlertmanagerPusher:
    """Engine listener plus one background sender per Alertmanager; ``start()``/``stop()`` bracket the threads."""

    def __init__(self, settings: AlertmanagerSettings, *, base_url: str,
                 client: httpx.Client | None = None, clock: Callable[[], float] = time.time,
                 max_resolved_kept: int = 100_000, silence_rules: Iterable[str] = ()) -> None:
        if not settings.targets:
            raise ValueError("alertmanager.url or alertmanager.urls is required to push alerts")
        self.settings = settings
        self.base_url = base_url
        self.clock = clock
        self.max_resolved_kept = max_resolved_kept
        # One client per Alertmanager unless one is injected (tests): a peer's slow connection pool
        # must not hold up another's requests.
        self._targets = [_Target(url, client or httpx.Client(timeout=settings.timeout_seconds))
                         for url in settings.targets]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._firing: dict[AlertKey, Alert] = {}
        self._silence_rules = frozenset(silence_rules)  # rules still sent for a silent job (fires_on_silence)
        self._silent: frozenset[str] = frozenset()  # jobs silent past silent_job_seconds (``hold``)

    @property
    def endpoints(self) -> list[str]:
        return [t.endpoint for t in self._targets]

    @property
    def sent_total(self) -> int:
        """Alerts acknowledged, summed over the Alertmanagers (one alert sent to two counts twice)."""
        return sum(t.sent_total for t in self._targets)

    @property
    def failed_total(self) -> int:
        """Failed pushes, summed over the Alertmanagers."""
        return sum(t.failed_total for t in self._targets)

    @property
    def dropped_total(self) -> int:
        """Resolved alerts dropped because an outbox was full (never in practice), summed over the Alertmanagers."""
        return sum(t.dropped_total for t in self._targets)

    # ------------------------------------------------------------- engine side (event loop)
    def on_transition(self, alert: Alert, previous: AlertState) -> None:
        key = (alert.job, alert.rule, alert.rank, alert.stream)
        with self._lock:
            if alert.state is AlertState.FIRING:
                self._firing[key] = alert
                for t in self._targets:
                    t.resolved.pop(key, None)
            elif alert.state is AlertState.RESOLVED:
                self._firing.pop(key, None)
                if self._held(alert):
                    return  # a handed-over job's alert: the shard that has the job now is the one to judge it
                payload = alert_payload(alert, base_url=self.base_url, now=self.clock(),
                                        expiry_seconds=self.settings.expiry_seconds)
                for t in self._targets:
                    if key not in t.resolved and len(t.resolved) >= self.max_resolved_kept:
                        t.resolved.pop(next(iter(t.resolved)))
                        t.dropped_total += 1
                    t.resolved[key] = payload
        for t in self._targets:
            t.wake.set()

    def restore(self, alerts: Iterable[Alert]) -> None:
        """Re-send the firing alerts a restarted healthd restored from its database (the engine's
        ``restore`` tells no listener): otherwise they would lapse in Alertmanager at the endsAt of the
        last push before the restart, shown resolved while healthd still holds them firing. Same labels,
        so Alertmanager notifies nothing new for an alert it still holds."""
        with self._lock:
            for alert in alerts:
                if alert.state is AlertState.FIRING:
                    self._firing[(alert.job, alert.rule, alert.rank, alert.stream)] = alert
        for t in self._targets:
            t.wake.set()

    def hold(self, silent_jobs: Iterable[str]) -> None:
        """The jobs silent past ``silent_job_seconds`` now (the server's ticker says, each tick): their
        alerts are no longer sent (firing or resolved), except the stalls'; a job that reports again
        is sent for again at the next push."""
        silent = frozenset(silent_jobs)
        with self._lock:
            self._silent = silent

    def _held(self, alert: Alert) -> bool:
        return alert.job in self._silent and alert.rule not in self._silence_rules

    def forget(self, job: str) -> None:
        """Stop re-sending a forgotten job's firing alerts (they expire in Alertmanager at their endsAt)."""
        with self._lock:
            for key in [k for k in self._firing if k[0] == job]:
                del self._firing[key]

    # ------------------------------------------------------------- senders
    def pending(self) -> int:
        """Alerts waiting to be (re-)sent: firing plus resolved ones some Alertmanager has not acknowledged."""
        with self._lock:
            return len(self._firing) + len(set().union(*(t.resolved for t in self._targets)))

    def flush(self) -> bool:
        """Send everything now to every Alertmanager; True when all acknowledged it (or there was nothing to send)."""
        return all([self._flush(t) for t in self._targets])

    def _flush(self, target: _Target) -> bool:
        now = self.clock()
        with self._lock:
            firing = [alert_payload(a, base_url=self.base_url, now=now, expiry_seconds=self.settings.expiry_seconds)
                      for a in self._firing.values() if not self._held(a)]
            resolved = dict(target.resolved)
        if not firing and not resolved:
            return True
        try:
            r = target.client.post(target.endpoint, json=[*firing, *resolved.values()])
            r.raise_for_status()
        except httpx.HTTPError as e:
            target.failed_total += 1
            log.warning("alertmanager push to %s failed (%d alerts kept for retry): %s",
                        target.endpoint, len(firing) + len(resolved), e)
            return False
        target.sent_total += len(firing) + len(resolved)
        with self._lock:
            for key, payload in resolved.items():
                if target.resolved.get(key) is payload:
                    del target.resolved[key]
        return True

    def _run(self, target: _Target) -> None:
        backoff = 0.5
        next_due = 0.0
        while not self._stop.is_set():
            target.wake.wait(timeout=max(0.0, next_due - time.monotonic()))
            target.wake.clear()
            if self._stop.is_set():
                break
            if self._flush(target):
                backoff = 0.5
                next_due = time.monotonic() + self.settings.resend_seconds
            else:
                next_due = time.monotonic() + backoff
                backoff = min(backoff * 2, self.settings.max_backoff_seconds)

    def start(self) -> None:
        for i, t in enumerate(self._targets):
            if t.thread is None:
                t.thread = threading.Thread(target=self._run, args=(t,), name=f"healthd-alertmanager-{i}",
                                            daemon=True)
                t.thread.start()

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop the senders after one last flush attempt each (resolved alerts go out on shutdown)."""
        self._stop.set()
        for t in self._targets:
            t.wake.set()
        for t in self._targets:
            if t.thread is not None:
                t.thread.join(timeout=timeout_seconds)
                t.thread = None
        self.flush()
        closed: set[int] = set()
        for t in self._targets:
            if id(t.client) not in closed:
                closed.add(id(t.client))
                t.client.close()
