"""Alert state and history in an embedded SQLite database, so a restart loses no alert.

``AlertDb`` is an engine ``AlertListener``: every pending->firing and firing->resolved transition
is encoded on the spot (the engine goes on changing its alerts) and handed to one writer thread,
which commits it (one short transaction per batch, WAL journal). The listener runs on the event
loop, inside ingest: a write there would hold every client's request for as long as the disk
takes. After ``kill -9`` and a restart the firing alerts are restored as firing (the engine's
``restore`` does not notify, so nothing is paged twice) and the resolved history is kept; what
``kill -9`` can lose is only the transitions the writer had not committed yet (queued behind a
slow disk). Pending alerts are not stored: they are re-derived from new data. On a graceful
shutdown ``flush`` writes the firing alerts' latest evidence and waits for the writer to finish.

What lives here: the table, the writer, save/load. What does not: alert logic (engine.alerts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from healthd.engine.alerts import Alert
from healthd.rules.base import EvidenceValue
from healthd.wire.schema import AlertState, Severity

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    resolved_at REAL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alerts_job_state ON alerts (job, state);
"""

Row = tuple[str, str, str, float, float | None, str]  # id, job, state, started_at, resolved_at, body
_STOP = object()  # close(): the writer's last item


class AlertDb:
    """SQLite-backed alert store. Writes (``on_transition``, ``save``) only queue: one writer thread
    commits them in order, so they never wait on the disk. ``max_queued`` bounds what a stuck disk can
    pile up; past it a write is dropped and counted (``writes_dropped_total``), not waited for.
    ``load`` and ``close`` may be called from any thread."""

    def __init__(self, path: str | Path, *, history_per_job: int = 1000, max_queued: int = 10_000) -> None:
        self.path = str(path)
        self.history_per_job = history_per_job
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode; each batch is its own short transaction.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # the connection: the writer's transactions against load/close
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed write survives the process being killed
            # (only an OS crash can lose the last transactions).
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        # (rows to upsert, job to prune or None), in transition order
        self._queue: queue.Queue[tuple[list[Row], str | None] | object] = queue.Queue(max_queued)
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self.writes_total = 0  # rows committed
        self.writes_dropped_total = 0  # rows refused: the queue was full
        self.write_errors_total = 0  # batches that failed to commit (logged)

    # ------------------------------------------------------------- AlertListener
    def on_transition(self, alert: Alert, previous: AlertState) -> None:
        self._put([_row(alert)], alert.job if alert.state is AlertState.RESOLVED else None)

    # ------------------------------------------------------------- writes
    def save(self, alerts: Iterable[Alert]) -> None:
        """Queue the alerts' current state for the writer (encoded now: the engine keeps changing them)."""
        rows = [_row(a) for a in alerts]
        if rows:
            self._put(rows, None)

    def flush(self, alerts: Iterable[Alert] = ()) -> None:
        """Queue the latest state of the given (firing) alerts and wait until every queued write is
        committed: a graceful shutdown's last step (from a thread, not the event loop: it waits on the disk)."""
        self.save([a for a in alerts if a.state is AlertState.FIRING])
        if self._writer is not None:
            self._queue.join()

    def write_batch(self, rows: list[Row], prune: list[str]) -> None:
        """The writer thread's one transaction: upsert ``rows`` (in order), then trim the resolved
        history of the ``prune`` jobs to ``history_per_job``."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO alerts (id, job, state, started_at, resolved_at, body) "
                    "VALUES (?, ?, ?, ?, ?, ?)", rows)
                for job in prune:
                    self._conn.execute(
                        "DELETE FROM alerts WHERE job = ? AND state = 'resolved' AND id NOT IN ("
                        "SELECT id FROM alerts WHERE job = ? AND state = 'resolved' "
                        "ORDER BY resolved_at DESC LIMIT ?)", (job, job, self.history_per_job))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _put(self, rows: list[Row], prune: str | None) -> None:
        self._start_writer()
        try:
            self._queue.put_nowait((rows, prune))
        except queue.Full:
            self.writes_dropped_total += len(rows)
            log.warning("alert database %s: %d writes queued behind the disk; dropped %d",
                        self.path, self._queue.maxsize, len(rows))

    def _start_writer(self) -> None:
        # Started by the first write, not at construction: an AlertDb only read (restore) owns no thread.
        if self._writer is None:
            with self._writer_lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="healthd-alert-db", daemon=True)
                    self._writer.start()

    def _write_loop(self) -> None:
        """Take what is queued (at least one item, waiting for it), commit it as one transaction, repeat."""
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            rows: list[Row] = []
            prune: list[str] = []
            for item in items:
                if isinstance(item, tuple):
                    rows.extend(item[0])
                    if item[1] is not None and item[1] not in prune:
                        prune.append(item[1])
            try:
                if rows or prune:
                    self.write_batch(rows, prune)
                    self.writes_total += len(rows)
            except Exception:
                self.write_errors_total += 1
                log.exception("alert database %s: a write of %d alerts failed", self.path, len(rows))
            finally:
                for _ in items:
                    self._queue.task_done()
            if stop:
                return

    # ------------------------------------------------------------- reads
    def load(self, *, now: float | None = None, stale_after_seconds: float | None = None) -> list[Alert]:
        """Firing and resolved alerts, oldest first (as committed). Firing alerts not updated for
        ``stale_after_seconds`` (their job would have expired) are left out."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT state, body FROM alerts WHERE state IN ('firing', 'resolved') ORDER BY started_at, id"
            ).fetchall()
        out = []
        for state, body in rows:
            try:
                alert = _decode(body)
            except (ValueError, KeyError, TypeError):
                log.warning("skipping an unreadable alert row in %s", self.path)
                continue
            if (state == AlertState.FIRING.value and now is not None and stale_after_seconds is not None
                    and now - alert.updated_at > stale_after_seconds):
                continue
            out.append(alert)
        return out

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the database."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(_STOP)  # behind every queued write; waits for room rather than drop it
            writer.join()
        with self._lock:
            self._conn.close()


def _row(a: Alert) -> Row:
    return (a.id, a.job, a.state.value, a.started_at, a.resolved_at, _encode(a))


def _encode(a: Alert) -> str:
    d = dataclasses.asdict(a)
    d["severity"], d["state"] = a.severity.value, a.state.value
    return json.dumps(d, allow_nan=True)  # NaN evidence is data


def _decode(body: str) -> Alert:
    d = json.loads(body)
    d["severity"], d["state"] = Severity(d["severity"]), AlertState(d["state"])
    evidence: dict[str, EvidenceValue] = dict(d["evidence"])
    d["evidence"] = evidence
    names = {f.name for f in dataclasses.fields(Alert)}
    return Alert(**{k: v for k, v in d.items() if k in names})
