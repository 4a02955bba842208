"""The server's time-driven work, with one start and one stop (``Lifecycle``).

Evaluation ticks (job-scoped rules, the expiry of silent jobs, telling the Alertmanager pusher
which jobs went silent: handed over to another shard, or gone, and, with ``cluster.route_url``, asking
the route which of them moved: ``healthd.server.handover``), sweeps of ranks waiting for
their rules, the garbage-collector policy and the Alertmanager pusher's thread start with the app
and stop with it; at the stop the alert database's writer thread (``healthd.engine.persistence``)
commits what is queued. Reads (``healthd.server.routes``) never do any of this: a scrape or a GET does not
expire, push or write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from healthd.alerting.alertmanager import AlertmanagerPusher
from healthd.server.gc_policy import ServingGC
from healthd.server.handover import Handover
from healthd.server.pipeline import Healthd

log = logging.getLogger(__name__)

_SLICE_SECONDS = 0.002  # how long the evaluation loops below run before letting requests in


async def in_slices(slices: Iterator[None]) -> None:
    """Run ``slices`` (Healthd.due_slices, the exposition) on the event loop, letting waiting requests
    in every ``_SLICE_SECONDS``: under load thousands of ranks may be queued."""
    deadline = time.perf_counter() + _SLICE_SECONDS
    for _ in slices:
        if time.perf_counter() > deadline:
            await asyncio.sleep(0)
            deadline = time.perf_counter() + _SLICE_SECONDS



class Lifecycle:
    """The background loops of one app: ``start`` in the ASGI lifespan's startup, ``stop`` at its shutdown."""

    def __init__(self, hd: Healthd, *, pusher: AlertmanagerPusher | None = None,
                 gc_policy: ServingGC | None = None) -> None:
        self.hd = hd
        self.pusher = pusher
        self.gc_policy = gc_policy
        self.handover: Handover | None = None  # cluster.route_url: made at the start, on the loop it uses
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self.pusher is not None:
            self.pusher.start()
        if self.hd.settings.cluster.route_url is not None:
            self.handover = Handover(self.hd, self.hd.settings.cluster)
            if self.pusher is not None:  # a forgotten job's firing alerts are no longer re-sent from here
                self.handover.on_handed_over = self.pusher.forget
        self._tasks = [asyncio.create_task(_ticker(self.hd, self.pusher, self.handover)),
                       asyncio.create_task(_sweeper(self.hd))]
        if self.gc_policy is not None:
            self.gc_policy.install()
            self._tasks.append(asyncio.create_task(_gc_keeper(self.gc_policy)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.handover is not None:
            await self.handover.close()
            self.handover = None
        hd = self.hd
        hd.settle()  # graceful shutdown: what was accepted is evaluated (and persisted below)
        if self.pusher is not None:
            await asyncio.to_thread(self.pusher.stop)
        if hd.alert_db is not None:  # graceful shutdown (SIGTERM): in-flight requests are done by now
            hd.alert_db.save(hd.engine.firing())  # encoded here, on the loop that owns the alerts
            await asyncio.to_thread(hd.alert_db.flush)  # waits for the writer thread and the disk


async def _sweeper(hd: Healthd, period: float = 0.05) -> None:
    """Evaluates waiting ranks while no request brings budget to them (the load stopped, or a rank
    went quiet), oldest first, within the budget."""
    while True:
        await asyncio.sleep(period)
        try:
            await in_slices(hd.due_slices())
        except Exception:
            log.exception("rank evaluation sweep failed")


async def _gc_keeper(policy: ServingGC) -> None:
    while True:
        await asyncio.sleep(policy.freeze_seconds)
        try:
            policy.tick()
        except Exception:
            log.exception("garbage collector policy failed")


def silent_jobs(hd: Healthd, since: float) -> list[str]:
    """The jobs this healthd has not heard from for ``alertmanager.silent_job_seconds``: the store's
    silent jobs, and, that long after ``since`` (the start), the jobs of alerts restored from --db
    that never reported here again (moved to another shard while this one was down)."""
    now, seconds = hd.clock(), hd.settings.alertmanager.silent_job_seconds
    silent = hd.store.silent(now, seconds)
    if now - since > seconds:
        silent += sorted({a.job for a in hd.engine.firing()} - set(hd.store.jobs))
    return silent


async def _ticker(hd: Healthd, pusher: AlertmanagerPusher | None = None, handover: Handover | None = None) -> None:
    period = hd.settings.engine.tick_seconds
    started = hd.clock()
    while True:
        await asyncio.sleep(period)
        try:
            if pusher is not None or handover is not None:
                silent = silent_jobs(hd, started)
                if pusher is not None:  # before the tick, whose expiry resolves jobs the pusher must know silent
                    pusher.hold(silent)
                if handover is not None:  # forgets what answers showed moved, asks anew in the background
                    handover.poll(silent)
            for _ in hd.tick_slices():
                await asyncio.sleep(0)  # requests waiting on the event loop go first
        except Exception:
            log.exception("tick failed")
