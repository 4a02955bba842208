"""Getting report dicts to healthd without ever blocking the training step.

What lives here: the ``Transport`` protocol (one POST), ``HttpTransport`` (httpx),
and ``Sender``: a daemon thread that owns a bounded queue, batches reports into
``POST /v1/reports`` bodies (each of one job's reports, named by its ``X-Healthd-Job``
header), retries with backoff, emits heartbeats and counts
what it sent, dropped and had rejected. What does not: building reports (the
monitor does that, as plain dicts; they are JSON-encoded here, off the training
thread).

Guarantees the training loop relies on:
- ``enqueue`` never blocks on I/O and never raises; when the queue is full the
  OLDEST report is dropped and counted (``dropped_total``). Reports of a batch
  that is being retried stay in the queue and count toward its bound.
- ``close(timeout)`` returns within ``timeout`` seconds (plus a few ms), whatever
  the server does; it is also run at interpreter exit.
- A forked child (a DataLoader worker) inherits a disabled sender: it neither
  sends the parent's reports again nor starts a thread.

healthd's answer to each push lists the job's firing alerts (``IngestResult.alerts``); the sender
thread parses them into ``alerts`` (a tuple replaced whole, ``alerts_version`` bumped on change),
for the monitor to act on at the next step, on the training thread.

Why this module is over 400 lines: ``Sender`` is one background thread's loop with its bounded queue,
batching, retries with backoff, drop counting, fork handling and the alerts it reads back; each of
those touches the same locked state, so they stay in one class.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from healthd_client.alerts import FiringAlert, parse_alerts
from healthd_client.config import MonitorConfig

logger = logging.getLogger("healthd_client")

REPORTS_PATH = "/v1/reports"
# The wire contract's version this client writes (healthd.wire.schema.SCHEMA_VERSION on the server;
# tests/client/test_transport.py holds them equal). The client imports nothing from the server.
SCHEMA_VERSION = 1
# The header that names the one job of a body's reports (healthd.wire.schema.JOB_HEADER, held equal
# by tests/client/test_transport.py): a proxy shards by it (docs/scaling.md).
JOB_HEADER = "X-Healthd-Job"

HeartbeatFactory = Callable[[bool], dict[str, Any]]


class Transport(Protocol):
    """Delivers one encoded batch. Raising means "not delivered, try again"."""

    def send(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
        """POST ``body``; return the HTTP status and the response text."""
        ...


class HttpTransport:
    """``Transport`` over httpx: ``POST {server}/v1/reports`` with a bounded timeout.

    ``httpx_transport`` is passed to ``httpx.Client`` (e.g. ``httpx.MockTransport``
    in tests).
    """

    def __init__(self, server: str, timeout_seconds: float, httpx_transport: Any = None) -> None:
        import httpx  # imported here so that `import healthd_client` stays cheap

        self._client = httpx.Client(
            base_url=server.rstrip("/"),
            timeout=httpx.Timeout(timeout_seconds),
            transport=httpx_transport,
        )

    def send(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
        response = self._client.post(REPORTS_PATH, content=body, headers=dict(headers))
        return response.status_code, response.text

    def close(self) -> None:
        self._client.close()


def _is_retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays a user might pass as an eval metric.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__float__"):
        return float(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _accepted_count(text: str) -> int:
    try:
        accepted = json.loads(text).get("accepted", 0)
    except (ValueError, AttributeError):
        return 0
    return accepted if isinstance(accepted, int) and accepted >= 0 else 0


class Sender:
    """Background sender: bounded queue, batching, retries, heartbeats, counters.

    ``heartbeat(closing)`` builds a HeartbeatReport dict; it is called on the
    sender thread every ``heartbeat_seconds`` and once with ``closing=True`` by
    ``close``. Counters (read them from any thread): ``sent_total``,
    ``dropped_total``, ``rejected_total``, ``failed_attempts_total``. ``alerts``: the
    firing alerts healthd's latest answer listed; ``alerts_version`` changes when they do.
    """

    def __init__(
        self,
        transport: Transport,
        config: MonitorConfig,
        *,
        token: str | None = None,
        heartbeat: HeartbeatFactory | None = None,
    ) -> None:
        self._transport = transport
        self._config = config
        self._heartbeat = heartbeat
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._items: deque[tuple[int, dict[str, Any]]] = deque()
        self._seq = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._last_send_failed = False  # the sender thread's latest attempt failed (close() gives up sooner)
        self._closed = False
        self._forked = False
        self._deadline = float("inf")
        self._flush_requested = False
        self._logged: set[str] = set()
        self._rng = random.Random()
        self.sent_total = 0
        self.dropped_total = 0
        self.rejected_total = 0
        self.failed_attempts_total = 0
        self.alerts: tuple[FiringAlert, ...] = ()
        self.alerts_version = 0
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="healthd-sender", daemon=True
        )
        self._thread.start()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _after_fork(ref))
        atexit.register(self.close)

    # ------------------------------------------------------------------ producer side

    def enqueue(self, report: dict[str, Any]) -> None:
        """Queue one report dict. Never blocks on I/O, never raises."""
        try:
            with self._lock:
                if self._forked:
                    return
                if self._closed:
                    self.dropped_total += 1
                    return
                self._append_locked(report)
        except Exception:  # the training loop must never see our failures
            pass

    def count_dropped(self, n: int) -> None:
        """Count reports lost before reaching the queue (e.g. by the monitor)."""
        with self._lock:
            self.dropped_total += n

    def flush_soon(self) -> None:
        """Send what is queued now rather than at the flush interval; returns at once (the
        monitor calls it after a NaN/Inf step when the job listens for alerts)."""
        with self._lock:
            self._flush_requested = True
            self._wake.notify_all()

    def pending(self) -> int:
        """Reports waiting in the queue (including a batch being retried)."""
        with self._lock:
            return len(self._items)

    def flush(self, timeout: float) -> bool:
        """Send what is queued now; wait up to ``timeout`` seconds. True if the queue emptied."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._flush_requested = True
            self._wake.notify_all()
            while self._items and not self._forked:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    break
                self._wake.wait(min(left, 0.05))
            return not self._items

    def close(self, timeout: float | None = None) -> None:
        """Send a closing heartbeat, flush within ``timeout`` seconds, stop. Idempotent."""
        timeout = self._config.close_timeout_seconds if timeout is None else max(0.0, timeout)
        with self._lock:
            if self._closing or self._closed or self._forked:
                self._closed = True
                return
            self._closing = True
            self._deadline = time.monotonic() + timeout
            # Make room first: a drop caused by appending the heartbeat would be
            # counted after the heartbeat took its count, and never reach healthd.
            while self._items and len(self._items) >= self._config.queue_capacity:
                _, lost = self._items.popleft()
                self.dropped_total += _counts(lost)
            closing_heartbeat = self._heartbeat_report(closing=True)
            if closing_heartbeat is not None:
                self._append_locked(closing_heartbeat)
            self._wake.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, self._deadline - time.monotonic()) + 0.05)
        with self._lock:
            self._closed = True
            finished = thread is None or not thread.is_alive()
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        if finished:
            closer = getattr(self._transport, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception:
                    pass

    # ------------------------------------------------------------------ sender thread

    def _append_locked(self, report: dict[str, Any]) -> None:
        self._seq += 1
        self._items.append((self._seq, report))
        overflow = len(self._items) - self._config.queue_capacity
        for _ in range(max(0, overflow)):
            _, lost = self._items.popleft()
            self.dropped_total += _counts(lost)
        if len(self._items) == 1 or len(self._items) >= self._config.max_batch_reports:
            self._wake.notify_all()  # start the flush-interval clock, or send a full batch now

    def _heartbeat_report(self, closing: bool) -> dict[str, Any] | None:
        if self._heartbeat is None:
            return None
        try:
            return self._heartbeat(closing)
        except Exception as exc:
            self._log_once("heartbeat", "healthd: building a heartbeat failed: %r", exc)
            return None

    def _run(self) -> None:
        cfg = self._config
        next_heartbeat = time.monotonic() + cfg.heartbeat_seconds
        last_send = time.monotonic()
        failures = 0
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    if self._closing or self._forked or now >= next_heartbeat:
                        break
                    if self._items and (
                        self._flush_requested
                        or len(self._items) >= cfg.max_batch_reports
                        or now - last_send >= cfg.flush_interval_seconds
                    ):
                        break
                    wait = next_heartbeat - now
                    if self._items:
                        wait = min(wait, cfg.flush_interval_seconds - (now - last_send))
                    self._wake.wait(max(wait, 0.001))
                if self._forked:
                    return
                closing = self._closing
                if not closing and now >= next_heartbeat:
                    beat = self._heartbeat_report(closing=False)
                    if beat is not None:
                        self._append_locked(beat)
                    next_heartbeat = now + cfg.heartbeat_seconds
            if closing:
                self._drain()
                return
            delivered = self._send_batch()
            last_send = time.monotonic()
            self._last_send_failed = not delivered
            if delivered:
                failures = 0
                continue
            failures += 1
            with self._lock:
                self._wake.wait_for(lambda: self._closing or self._forked, timeout=self._backoff(failures))

    def _drain(self) -> None:
        failures = 0
        while True:
            with self._lock:
                if not self._items or self._forked:
                    return
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self.dropped_total += sum(_counts(r) for _, r in self._items)
                    self._items.clear()
                    self._wake.notify_all()
                    return
            if self._send_batch():
                failures = 0
                self._last_send_failed = False
                continue
            if self._last_send_failed:
                # Two sends in a row failed (healthd is down or unreachable): waiting out the close
                # timeout would only hold up the training process's exit. What is left is dropped
                # and counted (the closing heartbeat cannot carry the count: it is among them).
                with self._lock:
                    self.dropped_total += sum(_counts(r) for _, r in self._items)
                    self._items.clear()
                    self._wake.notify_all()
                return
            self._last_send_failed = True
            failures += 1
            time.sleep(min(self._backoff(failures), max(0.0, self._deadline - time.monotonic())))

    def _backoff(self, failures: int) -> float:
        cfg = self._config
        ceiling = min(cfg.retry_backoff_max_seconds, cfg.retry_backoff_min_seconds * 2 ** min(failures, 30))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)  # "equal jitter"

    def _send_batch(self) -> bool:
        """Send the oldest batch. False when it should be retried (nothing was removed)."""
        with self._lock:
            batch = list(itertools.islice(self._items, self._config.max_batch_reports))
            job = batch[0][1].get("job") if batch else None
            # One job per body, so that X-Healthd-Job names every report's job. A monitor's reports
            # all carry its job; this holds the header true for any mix a caller might enqueue.
            batch = list(itertools.takewhile(lambda item: item[1].get("job") == job, batch))
            self._flush_requested = self._flush_requested and len(self._items) > len(batch)
        if not batch:
            return True
        last_seq = batch[-1][0]
        parts: list[str] = []
        unencodable = 0
        for _, report in batch:
            try:
                parts.append(json.dumps(report, separators=(",", ":"), default=_json_default))
            except (TypeError, ValueError) as exc:
                unencodable += 1
                self._log_once("encode", "healthd: dropping a report that is not JSON: %r", exc)
        rejected = unencodable
        sent = 0
        if parts:
            body = f'{{"schema_version":{SCHEMA_VERSION},"reports":[{",".join(parts)}]}}'.encode()
            try:
                status, text = self._transport.send(body, _with_job(self._headers, job))
            except Exception as exc:
                self.failed_attempts_total += 1
                self._log_once("send-exc", "healthd: sending reports failed (will retry): %r", exc)
                return False
            if _is_retryable(status):
                self.failed_attempts_total += 1
                self._log_once(f"status-{status}", "healthd: server answered %s (will retry)", status)
                return False
            self._read_alerts(text)
            if 200 <= status < 300:
                sent = len(parts)
            else:
                sent = min(_accepted_count(text), len(parts))
                rejected += len(parts) - sent
                self._log_once(
                    f"status-{status}",
                    "healthd: server rejected reports with status %s (not retried): %s",
                    status,
                    text[:2000],
                )
        with self._lock:
            while self._items and self._items[0][0] <= last_seq:
                self._items.popleft()
            self.sent_total += sent
            self.rejected_total += rejected
            self._wake.notify_all()
        return True

    def _read_alerts(self, text: str) -> None:
        if '"alerts"' in text:
            alerts = parse_alerts(text)
        elif '"accepted"' in text:  # healthd's answer without alerts: nothing fires (no JSON parse for it)
            alerts = ()
        else:
            return  # an error page from a proxy: what was said stands
        if alerts is not None and alerts != self.alerts:
            self.alerts = alerts  # one assignment: a reader on another thread sees the old or the new tuple
            self.alerts_version += 1

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key in self._logged:
            return
        self._logged.add(key)
        logger.warning(message, *args)

    def _after_fork_in_child(self) -> None:
        # The parent's thread does not exist here and its lock may have been held
        # at fork time: replace both, forget the parent's queue, send nothing.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._items = deque()
        self._forked = True
        self._closed = True
        self._thread = None


def _after_fork(ref: weakref.ref[Sender]) -> None:
    sender = ref()
    if sender is not None:
        sender._after_fork_in_child()


def _with_job(headers: dict[str, str], job: Any) -> dict[str, str]:
    """``headers`` plus ``X-Healthd-Job: job``, which a proxy in front of several healthd shards
    routes on without reading the body (docs/scaling.md). A job the header cannot carry (not a
    printable ASCII string) goes without it: the server then refuses the reports for their name."""
    if isinstance(job, str) and job.isascii() and job.isprintable() and job.strip() == job and job:
        return {**headers, JOB_HEADER: job}
    return headers


def _counts(report: dict[str, Any]) -> int:
    """Whether losing ``report`` counts as a dropped report.

    Heartbeats carry the drop count itself: a lost one is superseded by the next,
    and counting it would make the client's total one that no heartbeat can ever
    deliver (the closing heartbeat lost at the exit deadline).
    """
    return 0 if report.get("kind") == "heartbeat" else 1
