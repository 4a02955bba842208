"""healthd.rules.rank_stalled: a rank that stopped stepping without closing, told apart as hung or dead."""

from __future__ import annotations

from healthd.rules.rank_stalled import RankStalled
from healthd.rules.training_stalled import TrainingStalled
from tests.healthd.factories import NOW, job, rank


def test_rank_stalled_tells_hang_from_death_and_exit() -> None:
    rule = RankStalled(RankStalled.Config(stall_seconds=60, heartbeat_timeout_seconds=15))
    w = job(
        rank(0),  # stepping
        rank(1, last_step_time=NOW - 100),  # hung: heartbeats continue
        rank(2, last_step_time=NOW - 100, heartbeat_time=NOW - 90),  # dead: heartbeats stopped
        rank(3, last_step_time=NOW - 100, closing=True),  # exited cleanly
        rank(4, last_step_time=NOW - 30),  # slow, within the timeout
    )
    found = {f.rank: f for f in rule.evaluate(w)}
    assert sorted(found) == [1, 2]
    assert found[1].evidence["heartbeat_alive"] is True and "hang" in found[1].summary
    assert found[2].evidence["heartbeat_alive"] is False and "died" in found[2].summary
    assert TrainingStalled(TrainingStalled.Config(stall_seconds=60)).evaluate(w) is None
