"""The ASGI app: routes only. ``create_app(settings, ...)`` builds a fresh, self-contained instance.

Routes:
- ``POST /v1/reports``: a ``ReportBatch``; 200 when all reports were accepted,
  422 naming each rejected report's field (the valid ones are kept), 400 for
  an unparseable body, 413 for a body or batch over the limits.
- ``GET /v1/alerts?job=J&state=firing``: alerts, resolved ones included.
- ``GET /v1/jobs`` and ``GET /v1/jobs/{job}``: what healthd knows of each job.
- ``GET /v1/jobs/{job}/series``: the job's stored windows and alerts (``healthd.series``).
- ``GET /``: a server-rendered status page (``healthd.status_page``).
- ``GET /metrics``: Prometheus exposition (private registry).
- ``GET /healthz``: liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from healthd.alertmanager import AlertmanagerPusher
from healthd.auth import BearerAuth, authorized, expected_authorization
from healthd.engine import AlertListener, Engine
from healthd.exporter import Counters, HealthCollector, exposition_text
from healthd.gc_policy import ServingGC
from healthd.ingest import parse_batch
from healthd.limits import admit
from healthd.openapi import openapi_document
from healthd.persistence import AlertDb
from healthd.records import CLEAN, NameCheck, StepRecord
from healthd.rules import ALL_RULES
from healthd.rules.base import Rule
from healthd.rules.non_finite_values import nonfinite_parts
from healthd.scheduler import EvaluationQueue
from healthd.schema import AlertState, IngestResult, Rejection
from healthd.series import job_series
from healthd.settings import Settings, build_rules
from healthd.status_page import render_status_page
from healthd.store import Store

log = logging.getLogger(__name__)


@dataclass
class Healthd:
    """Everything one healthd instance holds; reachable as ``app.state.healthd``."""

    settings: Settings
    store: Store
    engine: Engine
    counters: Counters
    registry: CollectorRegistry  # holds ``collector``: generate_latest(registry) is the whole exposition
    collector: HealthCollector
    clock: Callable[[], float]
    queue: EvaluationQueue  # ranks waiting for their rules (healthd.scheduler)
    alert_db: AlertDb | None = None  # persistence.sqlite_path
    names: NameCheck = field(default_factory=NameCheck)  # job and layer names known valid (ingest)
    # IngestResult(accepted=n) for n <= limits.max_reports_per_request
    _all_accepted: dict[int, IngestResult] = field(default_factory=dict)

    TICK_RANKS_PER_SLICE = 256  # ~1-2 ms of per-rank work between the ticker's pauses

    def ingest(self, body: bytes) -> tuple[int, IngestResult]:
        """Validate and apply a report batch; returns (HTTP status, result)."""
        parsed = parse_batch(body, self.settings.limits.max_reports_per_request, self.names)
        if parsed.body_error is not None:
            err = parsed.body_error.errors[0]
            status = {"json_invalid": 400, "too_many_reports": 413}.get(err.type, 422)
            Counters.inc(self.counters.rejected, err.type)
            return status, IngestResult(accepted=0, rejected=[parsed.body_error])
        now = self.clock()
        limits = self.settings.limits
        capped: list[Rejection] = []
        accepted = 0
        every = self.settings.engine.max_steps_per_evaluation
        queue = self.queue
        # Step reports are applied in runs of one rank's consecutive steps (a request carries a rank's
        # queue). A run ends where the rank is due for evaluation: while the budget allows, every `every`
        # of its steps (a condition that came and went inside the request is still seen while it held),
        # and at once after a NaN/Inf, always. Ranks left waiting are evaluated at the end (evaluate_due).
        # A report joins the run only when the caps would judge it the same with the run applied: same
        # job and rank, and no layer name the job does not know yet. Such a report is admitted as it is
        # (as the run's first was); any other ends the run, which is applied before it is admitted.
        run: list[StepRecord] = []
        key: tuple[str, int] = ("", -1)
        known: set[str] | frozenset[str] = _NO_NAMES
        waiting = 0
        budget: bool | None = None  # queue.has_budget(), asked once until an evaluation spends some
        for pos, report in enumerate(parsed.reports):
            if not (run and isinstance(report, StepRecord) and report.rank == key[1] and report.job == key[0]
                    and report.layers.keys() <= known and report.activations.keys() <= known):
                if run:
                    self._apply_run(run, key, now)
                    run = []
                index = parsed.indices[pos] if parsed.indices is not None else pos
                admission = admit(self.store, limits, report, index)
                if admission is not None:  # past a cap: refused, or trimmed of new layer names
                    if admission.cap is not None and admission.error is not None:
                        Counters.inc(self.counters.capped, admission.cap)
                        capped.append(Rejection(index=index, errors=[admission.error]))
                    report = admission.report
                    if report is None:
                        continue
                if not isinstance(report, StepRecord):
                    accepted += 1
                    self.store.apply(report, now)
                    Counters.inc(self.counters.received, report.kind)
                    continue
                key = (report.job, report.rank)
                waiting = queue.waiting(key)
                job = self.store.jobs.get(report.job)
                known = job.layer_names if job is not None else _NO_NAMES
            accepted += 1
            run.append(report)
            if _urgent(report) or waiting + len(run) >= every and (
                    budget if budget is not None else (budget := queue.has_budget())):
                self._apply_run(run, key, now, evaluate=True)
                run, waiting, budget = [], 0, None
        if run:
            self._apply_run(run, key, now)
        self.evaluate_due()
        if parsed.rejected:
            Counters.inc(self.counters.rejected, "invalid", len(parsed.rejected))
        if capped:
            Counters.inc(self.counters.rejected, "cardinality_cap", len(parsed.reports) - accepted)
        if parsed.rejected or capped:
            rejected = sorted([*parsed.rejected, *capped], key=lambda r: r.index)
            return 422, IngestResult(accepted=accepted, rejected=rejected)
        result = self._all_accepted.get(accepted)
        if result is None:  # frozen, so one per count serves every request
            result = self._all_accepted[accepted] = IngestResult(accepted=accepted)
        return 200, result

    def _apply_run(self, run: list[StepRecord], key: tuple[str, int], now: float, evaluate: bool = False) -> None:
        """Apply one rank's consecutive steps, queue them for its rules, and evaluate it if asked."""
        self.store.apply_steps(run, now)
        Counters.inc(self.counters.received, "step", len(run))
        self.queue.add(key, now, len(run))
        if evaluate:
            self.evaluate_rank(key)

    def evaluate_rank(self, key: tuple[str, int]) -> None:
        """Run the rank-scoped rules on one queued rank over its waiting steps, charging the budget."""
        n = self.queue.take(key)
        job = self.store.jobs.get(key[0])
        if not n or job is None or key[1] not in job.ranks:
            return
        t0 = time.perf_counter()
        self.engine.on_step(self.store.rank_window(key[0], key[1], new_steps=n))
        self.queue.charge(time.perf_counter() - t0)

    def evaluate_due(self) -> None:
        """Evaluate queued ranks, oldest first, while the budget (engine.rank_rules_cpu_share) allows."""
        for _ in self.due_slices():
            pass

    def due_slices(self) -> Iterator[None]:
        """``evaluate_due`` a rank at a time (the server's sweeper serves requests in between)."""
        queue = self.queue
        while len(queue) and queue.has_budget():
            key = queue.oldest()
            assert key is not None
            self.evaluate_rank(key)
            yield

    def settle(self, job: str | None = None) -> None:
        """Evaluate every queued rank (of ``job`` if given) now, budget or not: what a read answers
        (alerts, a job's state) then covers every step accepted before it."""
        for _ in self.settle_slices(job):
            pass

    def settle_slices(self, job: str | None = None) -> Iterator[None]:
        """``settle`` a rank at a time; a rank evaluated meanwhile is no longer queued (a no-op)."""
        for key in self.queue.keys(job):
            self.evaluate_rank(key)
            yield

    def tick(self) -> None:
        """Run job-scoped rules and expire silent jobs, all at once (tests, the demo)."""
        for _ in self.tick_slices():
            pass

    def tick_slices(self) -> Iterator[None]:
        """``tick`` in slices: it pauses after expiring jobs, every ``TICK_RANKS_PER_SLICE`` ranks while
        building each job's window and computing a rule's per-rank summaries (``Rule.rank_summary``),
        and after each job-scoped rule. The server's ticker lets the event loop serve requests at each
        pause: a whole tick of a job of thousands of ranks takes tens of milliseconds.

        Rules that run after a pause see the window built before it: the ranks' step and GPU series
        are the store's own (they may have grown), their last-step times and ``now`` are as built.
        """
        for name in self.store.expire(self.clock()):
            self.queue.drop_job(name)
            self.engine.forget(name)
        rules = self.engine.job_rules
        if not rules:
            return
        yield
        per_slice = self.TICK_RANKS_PER_SLICE
        for job in self.store:
            window = yield from self.store.job_window_slices(job.name, self.clock(), per_slice)
            yield
            for rule in rules:
                if rule.summarized:
                    yield from self.engine.summarize_slices(rule, window, per_slice)
                self.engine.on_tick_rule(rule, window)
                yield


def build(settings: Settings, *, rules: Sequence[type[Rule]] = ALL_RULES,
          listeners: Iterable[AlertListener] = (), clock: Callable[[], float] = time.time) -> Healthd:
    """Assemble a healthd instance without the HTTP layer (used by create_app, tests, the demo)."""
    store = Store(settings.store, settings.exporter.window_seconds)
    listeners = list(listeners)
    alert_db = None
    if settings.persistence.sqlite_path:
        alert_db = AlertDb(settings.persistence.sqlite_path, history_per_job=settings.store.alert_history_per_job)
        listeners.append(alert_db)
    engine = Engine(build_rules(rules, settings.rules), history_per_job=settings.store.alert_history_per_job,
                    listeners=listeners, clock=clock)
    if alert_db is not None:
        # Restored without notifying: a firing alert stays firing and is not paged again.
        engine.restore(alert_db.load(now=clock(), stale_after_seconds=settings.store.job_ttl_seconds))
    counters = Counters()
    queue = EvaluationQueue(settings.engine.rank_rules_cpu_share, settings.engine.rank_rules_burst_seconds)
    registry = CollectorRegistry(auto_describe=False)
    collector = HealthCollector(store, engine, counters, queue, clock)
    registry.register(collector)
    return Healthd(settings, store, engine, counters, registry, collector, clock, queue, alert_db)


_NO_NAMES: frozenset[str] = frozenset()


def _urgent(step: StepRecord) -> bool:
    """A step with a NaN/Inf (as NonFiniteValues judges it): its rank is evaluated at once, whatever the budget."""
    if step.nonfinite is CLEAN and (step.loss is None or math.isfinite(step.loss)) and (
            step.grad_norm is None or math.isfinite(step.grad_norm)):
        return False  # the common case, decided without building nonfinite_parts' tuple
    return any(nonfinite_parts(step))


def _announced_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """A request's ``Content-Length`` (header names lower-case); None when absent or not a number."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class ReportsEndpoint:
    """``POST /v1/reports`` as a plain ASGI app: the hot path (every rank's every flush), so it skips
    Starlette's Request and Response objects; the 200 answer for ``n`` reports is encoded once.
    Under ``healthd.serving``'s protocol most requests skip ASGI too: ``direct`` and ``answer``."""

    path = b"/v1/reports"  # what ``direct`` serves (healthd.serving.DirectPost)

    def __init__(self, hd: Healthd) -> None:
        self.hd = hd
        self.max_body = hd.settings.limits.max_body_bytes
        self.expected_authorization = expected_authorization(hd.settings.auth)
        self._accepted: dict[int, bytes] = {}  # n -> the 200 body; n <= limits.max_reports_per_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body
        announced = _announced_length(scope["headers"])
        if announced is not None and announced > limit:
            await self._answer(send, 413, self._too_large())
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing was applied, nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._answer(send, 413, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        status, body = self.answer(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        await self._answer(send, status, body)

    def answer(self, body: bytes) -> tuple[int, bytes]:
        """Ingest a request's whole body; returns the HTTP status and the JSON answer. Also what
        ``healthd.serving`` calls for a request it answers without an ASGI task (``direct``)."""
        hd = self.hd
        status, result = hd.ingest(body)
        Counters.inc(hd.counters.requests, str(status))
        if status == 200:
            answer = self._accepted.get(result.accepted)
            if answer is None:
                answer = self._accepted[result.accepted] = result.model_dump_json().encode()
            return status, answer
        return status, result.model_dump_json().encode()

    def direct(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether a ``POST /v1/reports`` with these headers (names lower-case) may be answered by
        ``answer`` directly (``healthd.serving.DirectPost``): its body announces a length within
        limits.max_body_bytes and it carries the bearer token if one is required. Any other request
        goes through the app, which answers 413 or 401 (and counts them) as always."""
        announced = _announced_length(headers)
        return announced is not None and announced <= self.max_body and authorized(headers, self.expected_authorization)

    def _too_large(self) -> bytes:
        Counters.inc(self.hd.counters.rejected, "body_too_large")
        Counters.inc(self.hd.counters.requests, "413")
        return json.dumps({"accepted": 0, "rejected": [{"index": -1, "errors": [{
            "loc": [], "msg": f"request body over {self.max_body} bytes (limits.max_body_bytes)",
            "type": "body_too_large"}]}]}).encode()

    @staticmethod
    async def _answer(send: Send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ReportsFirst:
    """Middleware that hands ``POST /v1/reports`` to its endpoint directly, past Starlette's exception
    middleware and router (the route stays in the router for the OpenAPI document and other methods'
    405): 9.5 -> 6.1 us per ingest request in-process. Inside the authentication and the server-error
    middlewares, like every other route. Under a ``root_path`` the path does not match here and the
    router serves the request, as before."""

    def __init__(self, app: ASGIApp, reports: ReportsEndpoint) -> None:
        self.app = app
        self.reports = reports

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/reports" and scope["method"] == "POST":
            await self.reports(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _json(status: int, payload: object) -> Response:
    # NaN/Inf are data (a NaN loss is evidence): written as the JSON literals
    # NaN/Infinity, as the wire contract says, not refused.
    return Response(json.dumps(payload, allow_nan=True), status_code=status, media_type="application/json")


def create_app(settings: Settings | None = None, *, rules: Sequence[type[Rule]] = ALL_RULES,
               listeners: Iterable[AlertListener] = (), clock: Callable[[], float] = time.time,
               hd: Healthd | None = None, gc_policy: ServingGC | None = None) -> Starlette:
    """Build the ASGI app. Nothing is global: two apps never share state, and the process's garbage
    collector is left alone unless ``gc_policy`` is given (``healthd serve``)."""
    settings = settings or Settings()
    pusher = None
    if settings.alertmanager.url and hd is None:  # direct push to Alertmanager (healthd.alertmanager)
        pusher = AlertmanagerPusher(settings.alertmanager, clock=clock,
                                    base_url=settings.public_url or f"http://{settings.host}:{settings.port}")
        listeners = [*listeners, pusher]
    hd = hd or build(settings, rules=rules, listeners=listeners, clock=clock)
    async def get_alerts(request: Request) -> Response:
        job = request.query_params.get("job")
        state = request.query_params.get("state")
        if state is not None and state not in {s.value for s in AlertState}:
            return _json(400, {"error": f"state must be one of {[s.value for s in AlertState]}"})
        await _settle(hd, job)
        alerts = [a.out() for a in hd.engine.alerts(job)]
        if state:
            alerts = [a for a in alerts if a.state.value == state]
        return _json(200, {"alerts": [a.model_dump(mode="json") for a in alerts]})

    async def get_jobs(request: Request) -> Response:
        await _settle(hd)
        return _json(200, {"jobs": [_job_summary(hd, j.name) for j in hd.store]})

    async def get_job(request: Request) -> Response:
        name = request.path_params["job"]
        if name not in hd.store.jobs:
            return _json(404, {"error": f"no job named {name!r}"})
        await _settle(hd, name)
        job = hd.store.jobs[name]
        out = _job_summary(hd, name)
        out["attach"] = job.attach.model_dump(mode="json") if job.attach else None
        return _json(200, out)

    async def get_series(request: Request) -> Response:
        name = request.path_params["job"]
        await _settle(hd, name)
        series = job_series(hd.store, hd.engine, name)
        if series is None:
            return _json(404, {"error": f"no job named {name!r}"})
        return _json(200, series)

    async def status_page(request: Request) -> Response:
        await _settle(hd)
        return HTMLResponse(render_status_page(hd.store, hd.engine, hd.clock()))

    async def metrics(request: Request) -> Response:
        return Response(await _exposition(hd), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        # Cheap at any size (unlike /metrics): what a probe or a load test can poll every second.
        since = hd.queue.oldest_since()
        return _json(200, {"status": "ok", "jobs": len(hd.store.jobs),
                           "rank_evaluations_pending": len(hd.queue),
                           "rank_evaluation_delay_seconds": 0.0 if since is None else max(0.0, hd.clock() - since),
                           "rule_evaluations_total": hd.engine.evaluation_count})

    openapi = json.dumps(openapi_document()).encode()

    async def get_openapi(request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if pusher is not None:
            pusher.start()
        tasks = [asyncio.create_task(_ticker(hd)), asyncio.create_task(_sweeper(hd))]
        if gc_policy is not None:
            gc_policy.install()
            tasks.append(asyncio.create_task(_gc_keeper(gc_policy)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            hd.settle()  # graceful shutdown: what was accepted is evaluated (and persisted below)
            if pusher is not None:
                await asyncio.to_thread(pusher.stop)
            if hd.alert_db is not None:  # graceful shutdown (SIGTERM): in-flight requests are done by now
                hd.alert_db.flush(hd.engine.firing())

    reports = ReportsEndpoint(hd)
    app = Starlette(
        routes=[
            Route("/v1/reports", reports, methods=["POST"]),
            Route("/v1/alerts", get_alerts, methods=["GET"]),
            Route("/v1/jobs", get_jobs, methods=["GET"]),
            Route("/v1/jobs/{job:path}/series", get_series, methods=["GET"]),
            Route("/v1/jobs/{job:path}", get_job, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/", status_page, methods=["GET"]),
            Route("/openapi.json", get_openapi, methods=["GET"]),
        ],
        middleware=[Middleware(BearerAuth, settings=settings.auth, on_refused=lambda: _count_unauthorized(hd)),
                    Middleware(ReportsFirst, reports=reports)],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.healthd = hd
    app.state.direct_post = reports  # healthd.serving answers POST /v1/reports without an ASGI task
    app.state.alertmanager = pusher
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    # Every answer of the API is JSON, the router's own 404/405 included (the OpenAPI document says so).
    assert isinstance(exc, HTTPException)
    response = _json(exc.status_code, {"error": exc.detail})
    response.headers.update(exc.headers or {})  # a 405's Allow
    return response


def _count_unauthorized(hd: Healthd) -> None:
    hd.counters.unauthorized += 1


def _job_summary(hd: Healthd, name: str) -> dict[str, object]:
    job = hd.store.jobs[name]
    firing = [a for a in hd.engine.alerts(name, include_resolved=False, include_pending=False)]
    return {
        "job": name,
        "world_size": job.meta.world_size,
        "ranks": sorted(job.ranks),
        "last_seen": job.last_seen,
        "last_step": max((st.last_step.step for st in job.ranks.values() if st.last_step), default=None),
        "firing": len(firing),
        "global_batch_size": job.global_batch_size,
    }


_SLICE_SECONDS = 0.002  # how long the evaluation loops below run before letting requests in


async def _in_slices(slices: Iterator[None]) -> None:
    """Run ``slices`` (Healthd.settle_slices, due_slices) on the event loop, letting waiting requests
    in every ``_SLICE_SECONDS``: under load thousands of ranks may be queued."""
    deadline = time.perf_counter() + _SLICE_SECONDS
    for _ in slices:
        if time.perf_counter() > deadline:
            await asyncio.sleep(0)
            deadline = time.perf_counter() + _SLICE_SECONDS


async def _exposition(hd: Healthd) -> bytes:
    """``generate_latest(hd.registry)``, letting waiting requests in every ``_SLICE_SECONDS``: at
    2,048 ranks the exposition is ~4 MiB, and rendered in one go it held the event loop (and so
    every client's ingest) for most of a second per scrape. Families are formatted one at a time
    (``exposition_text``), sharing the text of label sets they repeat."""
    out: list[bytes] = []
    labels_text: dict[tuple[tuple[str, str], ...], str] = {}

    def render() -> Iterator[None]:
        for family in hd.collector.collect_in_slices():
            if family is not None:
                out.append(exposition_text(family, labels_text))
            yield None

    await _in_slices(render())
    return b"".join(out)


async def _settle(hd: Healthd, job: str | None = None) -> None:
    """A read answers for every step accepted before it (``Healthd.settle``, in slices)."""
    await _in_slices(hd.settle_slices(job))


async def _sweeper(hd: Healthd, period: float = 0.05) -> None:
    """Evaluates waiting ranks while no request brings budget to them (the load stopped, or a rank
    went quiet), oldest first, within the budget."""
    while True:
        await asyncio.sleep(period)
        try:
            await _in_slices(hd.due_slices())
        except Exception:
            log.exception("rank evaluation sweep failed")


async def _gc_keeper(policy: ServingGC) -> None:
    while True:
        await asyncio.sleep(policy.freeze_seconds)
        try:
            policy.tick()
        except Exception:
            log.exception("garbage collector policy failed")


async def _ticker(hd: Healthd) -> None:
    period = hd.settings.engine.tick_seconds
    while True:
        await asyncio.sleep(period)
        try:
            for _ in hd.tick_slices():
                await asyncio.sleep(0)  # requests waiting on the event loop go first
        except Exception:
            log.exception("tick failed")
