"""RankDesync on a job that ended: a final window judges closed ranks too (item: a job that ends is
still judged)."""

from __future__ import annotations

import msgspec
import pytest

from healthd.rules.rank_desync import RankDesync
from healthd.state.windows import JobMeta, JobWindow, RankStatus
from healthd.wire.schema import HeartbeatReport
from tests.healthd.factories import steps


def _rank(r: int, fingerprints: list[float], closed: bool) -> RankStatus:
    st = [msgspec.structs.replace(s, rank=r) for s in steps(len(fingerprints), param_fingerprint=fingerprints)]
    hb = HeartbeatReport(job="j", rank=r, time=0.0, closing=closed)
    return RankStatus(rank=r, steps=st, last_step=st[-1].step, last_step_time=0.0, last_heartbeat=hb,
                      last_heartbeat_time=0.0, closed=closed)


@pytest.mark.parametrize(("closed", "final", "expected"), [
    ((False, False), False, [1]),  # a running job: judged as always
    ((True, True), False, []),  # closed ranks of a running job's window are skipped
    ((True, True), True, [1]),  # the job ended: every report it sent is judged
    ((True, False), True, [1]),  # about to expire with one rank closed and one silent
])
def test_final_window_judges_closed_ranks(closed: tuple[bool, bool], final: bool, expected: list[int]) -> None:
    ranks = {0: _rank(0, [1.0, 2.0, 3.0], closed[0]), 1: _rank(1, [1.0, 2.0, 3.5], closed[1])}
    found = RankDesync().evaluate(JobWindow(job="j", meta=JobMeta(), now=0.0, ranks=ranks, final=final))
    assert [f.rank for f in found] == expected


def test_final_window_of_an_agreeing_job_is_quiet() -> None:
    ranks = {r: _rank(r, [1.0, 2.0, 3.0], True) for r in range(4)}
    assert RankDesync().evaluate(JobWindow(job="j", meta=JobMeta(), now=0.0, ranks=ranks, final=True)) == []
