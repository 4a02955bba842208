"""A job that ends is still judged: once every rank closed, and when the job is about to expire, the
job-scoped rules see every report it sent (``Healthd.tick``), closed ranks included."""

from __future__ import annotations

from healthd.engine.alerts import Alert
from healthd.rules.rank_desync import RankDesync
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.wire.schema import AlertState, HeartbeatReport
from tests.healthd.factories import step


def _desynced_ddp_job(hd: Healthd, now: float, close: tuple[bool, bool]) -> None:
    """150 steps on two ranks, fingerprinted every 50; rank 1 drifts from step 100 on."""
    for rank in (0, 1):
        for i in range(150):
            fp = None if i % 50 else (float(i) + (0.5 if rank == 1 and i >= 100 else 0.0))
            hd.store.apply(step(i, job="ddp", rank=rank, loss=1.0, param_fingerprint=fp), now)
        hd.store.apply(HeartbeatReport(job="ddp", rank=rank, time=now, closing=close[rank]), now)


def test_job_whose_ranks_all_closed_is_judged_over_every_report() -> None:
    now = [1000.0]
    hd = build(Settings(), rules=[RankDesync], clock=lambda: now[0])
    _desynced_ddp_job(hd, now[0], close=(True, True))  # it ended before any tick ran
    hd.tick()
    (alert,) = hd.engine.firing()
    assert (alert.rule, alert.rank, alert.step) == ("RankDesync", 1, 100)


def test_job_about_to_expire_is_judged_before_it_is_forgotten() -> None:
    now = [1000.0]
    seen: list[tuple[str, int | None, AlertState]] = []

    class Listener:
        def on_transition(self, alert: Alert, previous: AlertState) -> None:
            seen.append((alert.rule, alert.rank, alert.state))

    hd = build(Settings(), rules=[RankDesync], clock=lambda: now[0], listeners=[Listener()])
    _desynced_ddp_job(hd, now[0], close=(True, False))  # rank 0 closed, rank 1 went silent
    hd.tick()
    assert seen == []  # a running job: the closed rank is not compared with the live one
    now[0] += hd.settings.store.job_ttl_seconds + 1
    hd.tick()
    assert not hd.store.jobs
    # it fired in the final evaluation, then expiry resolved it (Alertmanager hears both)
    assert seen == [("RankDesync", 1, AlertState.FIRING), ("RankDesync", 1, AlertState.RESOLVED)]


def test_closed_job_that_agrees_stays_quiet() -> None:
    now = [1000.0]
    hd = build(Settings(), rules=[RankDesync], clock=lambda: now[0])
    for rank in (0, 1):
        for i in range(100):
            hd.store.apply(step(i, job="ok", rank=rank, loss=1.0, param_fingerprint=None if i % 50 else float(i)),
                           now[0])
        hd.store.apply(HeartbeatReport(job="ok", rank=rank, time=now[0], closing=True), now[0])
    hd.tick()
    assert hd.engine.firing() == []
