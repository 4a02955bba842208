"""Telling a job that moved to another shard from a job that died (``cluster.route_url``).

Behind a proxy that hashes by job, a job moves when its shard dies and moves back when it returns
(failback). The shard that had it meanwhile hears nothing more from it, exactly as if it had died:
without this module it would page ``TrainingStalled`` after ``stall_seconds`` for a job that trains
fine on its owner, and export the job's stale series until ``store.job_ttl_seconds``.

So a job silent here for ``alertmanager.silent_job_seconds`` is looked up once through the route,
the way its clients reach healthd (``GET {route_url}/v1/jobs/{job}`` with ``X-Healthd-Job``), in a
background task of the event loop, never from ingest. When the shard that answers heard from the
job *later* than this one (``moved_elsewhere``), the job lives there: this shard forgets it at the
ticker's next tick (``Healthd.hand_over``: quietly, no resolve sent) and counts it. When the answer is
this shard's own (the same data), a 404, an error or no answer, nothing changes: a real stall still
pages. A job found not moved is asked again at most every ``cluster.route_recheck_seconds``.

The look-up starts at ``silent_job_seconds`` (60 s by default), well before the stall rules fire
(``stall_seconds``, 300 s): a ``stall_seconds`` shorter than it pages before the question is asked.
Comparing ``last_seen`` across shards assumes their clocks agree to better than
``silent_job_seconds``: this shard last heard from the job that long ago, the owner just now.

What does not live here: when a job counts as silent (``healthd.server.lifecycle.silent_jobs``), what
forgetting does (``healthd.server.pipeline.Healthd.hand_over``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx

from healthd.server.pipeline import Healthd
from healthd.settings import ClusterSettings
from healthd.wire.schema import JOB_HEADER

log = logging.getLogger(__name__)

SHARD_HEADER = "X-Healthd-Shard"  # the shard that answered, as the deployed HAProxy names it (logs only)


@dataclass(frozen=True)
class JobMark:
    """What a shard last heard of a job: when (wall time) and the highest step of its unnamed stream."""

    last_seen: float
    last_step: int | None


def mark_of(hd: Healthd, job: str) -> JobMark | None:
    """This shard's ``JobMark`` of ``job`` (the fields ``GET /v1/jobs/{job}`` answers), None if unknown."""
    state = hd.store.jobs.get(job)
    if state is None:
        return None
    steps = [st.last_step.step for st in state.ranks.values() if st.last_step is not None]
    return JobMark(state.last_seen, max(steps, default=None))


def moved_elsewhere(ours: JobMark, answer: Mapping[str, object]) -> bool:
    """Whether the route's answer (a ``GET /v1/jobs/{job}`` body) shows the job's data newer than ours:
    heard from later, or a later step. Our own answer (equal data) or an older copy (a shard that had
    the job before us) is not: the job may really have stopped."""
    seen, step = answer.get("last_seen"), answer.get("last_step")
    if isinstance(seen, int | float) and not isinstance(seen, bool) and seen > ours.last_seen:
        return True
    return (isinstance(step, int) and not isinstance(step, bool) and ours.last_step is not None
            and step > ours.last_step)


class Handover:
    """Asks the route about this shard's silent jobs and forgets those that moved. ``poll`` on each tick
    (event loop), ``close`` at the stop. ``on_handed_over(job)`` runs after a job was forgotten (the
    Alertmanager pusher stops re-sending its alerts)."""

    def __init__(self, hd: Healthd, settings: ClusterSettings, *,
                 on_handed_over: Callable[[str], None] = lambda job: None,
                 client: httpx.AsyncClient | None = None) -> None:
        if settings.route_url is None:
            raise ValueError("cluster.route_url is required to look jobs up through the route")
        self.hd = hd
        self.url = settings.route_url.rstrip("/")
        self.recheck_seconds = settings.route_recheck_seconds
        self.on_handed_over = on_handed_over
        token = hd.settings.auth.token
        self._auth = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
        self._client = client or httpx.AsyncClient(timeout=settings.route_timeout_seconds)
        self._asked: dict[str, float] = {}  # job -> when last asked (the cache)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # look-ups in flight, one per job
        self._moved: dict[str, tuple[JobMark, str]] = {}  # answered moved: our mark then, where it went

    def poll(self, silent: Iterable[str]) -> None:
        """Forget the jobs the answers so far showed moved, then start a look-up for each silent job not
        asked within ``route_recheck_seconds`` (none waits here). Called by the ticker before its tick:
        a job is forgotten there, as TTL expiry forgets, never while a tick is paused halfway through."""
        self._forget_moved()
        now = self.hd.clock()
        silent = [job for job in silent if job in self.hd.store.jobs]
        for job in [j for j in self._asked if j not in self.hd.store.jobs]:
            del self._asked[job]  # forgotten (TTL, or moved): a job that comes back is asked afresh
        for job in silent:
            if job in self._tasks or now - self._asked.get(job, -float("inf")) < self.recheck_seconds:
                continue
            self._asked[job] = now
            task = asyncio.create_task(self._ask(job), name=f"healthd-handover-{job}")
            self._tasks[job] = task
            task.add_done_callback(functools.partial(self._done, job))

    def _done(self, job: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(job) is task:
            del self._tasks[job]
        if not task.cancelled() and task.exception() is not None:
            log.error("looking job %s up through %s failed", job, self.url, exc_info=task.exception())

    async def _ask(self, job: str) -> None:
        try:
            answer = await self._client.get(f"{self.url}/v1/jobs/{job}", headers={JOB_HEADER: job, **self._auth})
        except httpx.HTTPError as e:  # the route is down: keep the job, a real stall still pages
            log.debug("looking job %s up through %s failed: %s", job, self.url, e)
            return
        if answer.status_code != 200:
            return  # 404: no shard behind the route has the job (it stopped); 401/5xx: no answer
        try:
            body = answer.json()
        except ValueError:
            return
        ours = mark_of(self.hd, job)  # now, after the wait: the job may have reported here meanwhile
        if ours is not None and isinstance(body, dict) and moved_elsewhere(ours, body):
            self._moved[job] = (ours, f"{answer.headers.get(SHARD_HEADER, 'a shard')} heard from it at "
                                      f"{body.get('last_seen')}, step {body.get('last_step')}")

    def _forget_moved(self) -> None:
        moved, self._moved = self._moved, {}
        silence = self.hd.settings.alertmanager.silent_job_seconds
        for job, (mark, where) in moved.items():
            ours = mark_of(self.hd, job)
            if ours != mark or ours is None or self.hd.clock() - ours.last_seen <= silence:
                continue  # it reported here since the answer (moved back), or is gone already
            self.hd.hand_over(job)
            self._asked.pop(job, None)
            log.info("job %s moved to another shard (through %s, %s; here last at %.3f, step %s): forgotten "
                        "here without paging", job, self.url, where, ours.last_seen, ours.last_step)
            self.on_handed_over(job)

    async def answered(self) -> None:
        """Wait until the look-ups in flight are answered (or failed): for tests and tools."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        await self._client.aclose()
