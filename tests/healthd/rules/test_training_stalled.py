"""healthd.rules.training_stalled: every rank that has not closed stopped stepping."""

from __future__ import annotations

from healthd.rules.training_stalled import TrainingStalled
from tests.healthd.factories import NOW, job, rank


def test_training_stalled_when_every_live_rank_stopped() -> None:
    cfg = TrainingStalled.Config(stall_seconds=60, heartbeat_timeout_seconds=15)
    w = job(rank(0, n=10, last_step_time=NOW - 70), rank(1, n=8, last_step_time=NOW - 80, heartbeat_time=NOW - 50),
            rank(2, last_step_time=NOW - 500, closing=True))
    f = TrainingStalled(cfg).evaluate(w)
    assert f is not None and f.rank is None
    assert f.evidence["rank_furthest_behind"] == 1 and f.evidence["ranks_heartbeat_alive"] == 1
    assert f.evidence["ranks"] == 2
    done = job(rank(0, last_step_time=NOW - 500, closing=True), rank(1, last_step_time=NOW - 500, closing=True))
    assert TrainingStalled(cfg).evaluate(done) is None
