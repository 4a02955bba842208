"""Alert state and history in an embedded SQLite database, so a restart loses no alert.

``AlertDb`` is an engine ``AlertListener``: every pending->firing and firing->resolved
transition is written (one small transaction, WAL journal) before the engine moves on,
so after ``kill -9`` and a restart the firing alerts are restored as firing (the
engine's ``restore`` does not notify, so nothing is paged twice) and the resolved
history is kept. Pending alerts are not stored: they are re-derived from new data.
On a graceful shutdown ``flush`` writes the firing alerts' latest evidence.

What lives here: the table, save/load. What does not: alert logic (engine.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
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


class AlertDb:
    """SQLite-backed alert store; safe to call from any one thread at a time."""

    def __init__(self, path: str | Path, *, history_per_job: int = 1000) -> None:
        self.path = str(path)
        self.history_per_job = history_per_job
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode; each write is its own short transaction.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed write survives the process being killed
            # (only an OS crash can lose the last transactions).
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        self.writes_total = 0

    # ------------------------------------------------------------- AlertListener
    def on_transition(self, alert: Alert, previous: AlertState) -> None:
        self.save([alert])
        if alert.state is AlertState.RESOLVED:
            self._prune(alert.job)

    # ------------------------------------------------------------- writes
    def save(self, alerts: Iterable[Alert]) -> None:
        rows = [(a.id, a.job, a.state.value, a.started_at, a.resolved_at, _encode(a)) for a in alerts]
        if not rows:
            return
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO alerts (id, job, state, started_at, resolved_at, body) "
                    "VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self.writes_total += len(rows)

    def flush(self, alerts: Iterable[Alert]) -> None:
        """Write the latest state of the given (firing) alerts: called on graceful shutdown."""
        self.save([a for a in alerts if a.state is AlertState.FIRING])

    def _prune(self, job: str) -> None:
        with self._lock:
            self._conn.execute(
                "DELETE FROM alerts WHERE job = ? AND state = 'resolved' AND id NOT IN ("
                "SELECT id FROM alerts WHERE job = ? AND state = 'resolved' "
                "ORDER BY resolved_at DESC LIMIT ?)", (job, job, self.history_per_job))

    # ------------------------------------------------------------- reads
    def load(self, *, now: float | None = None, stale_after_seconds: float | None = None) -> list[Alert]:
        """Firing and resolved alerts, oldest first. Firing alerts not updated for
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
        with self._lock:
            self._conn.close()


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
