"""A slow disk does not slow ingest: alert transitions reach SQLite through the alert database's
writer thread, so a real server answers reports that fire and resolve alerts while that thread is
stuck in a write, and everything is written once the disk answers."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

from healthd.rules.non_finite_values import NonFiniteValues
from healthd.server.pipeline import build
from healthd.settings import Settings
from tests.healthd.slow_disk import SlowDisk
from tests.live import LiveHealthd, live_healthd


def _post(live: LiveHealthd, job: str, steps: range, nan_at: int | None = None) -> None:
    reports = [{"kind": "step", "job": job, "rank": 0, "time": 1.0, "step": s,
                "loss": math.nan if s == nan_at else 1.0} for s in steps]
    r = live.post("/v1/reports", content=json.dumps({"schema_version": 1, "reports": reports}, allow_nan=True))
    assert r.status_code == 200, r.text


def _states(live: LiveHealthd, job: str) -> list[str]:
    return [a["state"] for a in live.get("/v1/alerts", params={"job": job}).json()["alerts"]]


def test_reports_that_fire_and_resolve_alerts_are_answered_while_the_disk_is_stuck(tmp_path: Path) -> None:
    settings = Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1.0},  # evaluated before answering
                                      "rules": {"NonFiniteValues": {"resolve_after_steps": 1}}})
    db = SlowDisk(tmp_path / "alerts.sqlite")
    hd = build(settings, rules=[NonFiniteValues], alert_db=db)
    jobs = [f"job-{k}" for k in range(4)]
    with live_healthd(settings, hd=hd) as live:
        _post(live, jobs[0], range(4), nan_at=3)
        assert db.entered.wait(timeout=30)  # the writer is stuck committing job-0's firing alert
        _post(live, jobs[0], range(4, 6))
        for job in jobs[1:]:
            _post(live, job, range(4), nan_at=3)
            assert _states(live, job) == ["firing"]
            _post(live, job, range(4, 6))
        assert all(_states(live, job) == ["resolved"] for job in jobs)
        assert db.writes_total == 0 and not db.release.is_set()  # every answer above came while the disk was stuck

        db.release.set()
        db.flush()
        assert db.writes_total == 2 * len(jobs)  # each alert's firing and its resolution
        alerts = {a["id"]: a["job"] for a in live.get("/v1/alerts").json()["alerts"]}
    with sqlite3.connect(tmp_path / "alerts.sqlite") as conn:
        rows = conn.execute("SELECT id, job, state FROM alerts ORDER BY job").fetchall()
    assert sorted(rows) == sorted((i, job, "resolved") for i, job in alerts.items())
    assert sorted(alerts.values()) == jobs
