"""healthd.engine.persistence: alert transitions are committed by one writer thread, in order; a
full queue drops and counts instead of blocking the caller; flush and close drain it."""

from __future__ import annotations

from pathlib import Path

from healthd.engine.alerts import Alert
from healthd.engine.persistence import AlertDb
from healthd.wire.schema import AlertState, Severity
from tests.healthd.slow_disk import SlowDisk


def alert(n: int, state: AlertState = AlertState.FIRING, job: str = "j") -> Alert:
    return Alert(id=f"a{n}", rule="NonFiniteValues", severity=Severity.CRITICAL, state=state, job=job, rank=0,
                 layer=None, step=n, last_step=n, summary="nan", evidence={"loss": float("nan")}, advice="",
                 started_at=float(n), updated_at=float(n),
                 resolved_at=float(n) + 0.5 if state is AlertState.RESOLVED else None)


def test_transitions_are_committed_in_order_and_restored(tmp_path: Path) -> None:
    db = AlertDb(tmp_path / "a.sqlite", history_per_job=2)
    for n in range(4):
        db.on_transition(alert(n), AlertState.PENDING)
        db.on_transition(alert(n, AlertState.RESOLVED), AlertState.FIRING)  # the same id: the last state wins
    db.on_transition(alert(9), AlertState.PENDING)
    db.flush()
    db.close()
    restored = AlertDb(tmp_path / "a.sqlite").load()
    assert [(a.id, a.state) for a in restored] == [  # resolved history pruned to the newest 2
        ("a2", AlertState.RESOLVED), ("a3", AlertState.RESOLVED), ("a9", AlertState.FIRING)]


def test_a_stuck_disk_fills_the_queue_and_later_writes_are_dropped_not_waited_for(tmp_path: Path) -> None:
    db = SlowDisk(tmp_path / "a.sqlite", max_queued=2)
    db.on_transition(alert(0), AlertState.PENDING)
    assert db.entered.wait(timeout=30)  # the writer holds a0, stuck in its transaction
    for n in (1, 2, 3):
        db.on_transition(alert(n), AlertState.PENDING)  # a1, a2 queued; a3 has no room
    assert db.writes_dropped_total == 1 and db.writes_total == 0
    db.release.set()
    db.flush()
    assert db.writes_total == 3 and [a.id for a in db.load()] == ["a0", "a1", "a2"]
    db.close()


def test_flush_writes_the_firing_alerts_and_close_drains(tmp_path: Path) -> None:
    db = AlertDb(tmp_path / "a.sqlite")
    db.flush([alert(0), alert(1, AlertState.RESOLVED)])  # firing only: a resolution is written when it happens
    assert [a.id for a in db.load()] == ["a0"]
    db.save([alert(2)])
    db.close()
    assert [a.id for a in AlertDb(tmp_path / "a.sqlite").load()] == ["a0", "a2"]
