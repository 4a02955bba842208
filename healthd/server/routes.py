"""The read side of the API: alerts, jobs, series, the status page, ``/metrics``, health, OpenAPI.

Each handler answers from the store and the engine as they are, and changes neither: a GET runs no
rule, expires nothing, pushes nothing and writes nothing (STYLE.md, "Reads never mutate"). Steps a
rank reported but whose rules have not run yet (``engine.rank_rules_cpu_share``'s queue) are
evaluated by ingest and by the lifecycle's sweeper (``healthd.server.lifecycle``), not by a read;
``/healthz`` says how many ranks wait and for how long. The write side is ``healthd.server.reports``.
A scrape encodes in a worker thread what it collected on the event loop (``_collect``, ``_encode``).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable, Iterator

from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from healthd.exposition.collector import Collected
from healthd.exposition.series import job_series
from healthd.exposition.status_page import render_status_page
from healthd.server.lifecycle import in_slices
from healthd.server.pipeline import Healthd
from healthd.wire.openapi import openapi_document
from healthd.wire.schema import AlertState


def _json(status: int, payload: object) -> Response:
    # NaN/Inf are data (a NaN loss is evidence): written as the JSON literals
    # NaN/Infinity, as the wire contract says, not refused.
    return Response(json.dumps(payload, allow_nan=True), status_code=status, media_type="application/json")



def read_routes(hd: Healthd) -> list[Route]:
    """The GET routes of one instance. The handlers are ``async`` though most await nothing: so they
    run on the event loop, which owns the store and the engine (a plain function would be run in a
    thread pool, reading them while ingest changes them)."""
    async def get_alerts(request: Request) -> Response:
        job = request.query_params.get("job")
        state = request.query_params.get("state")
        if state is not None and state not in {s.value for s in AlertState}:
            return _json(400, {"error": f"state must be one of {[s.value for s in AlertState]}"})
        alerts = [a.out() for a in hd.engine.alerts(job)]
        if state:
            alerts = [a for a in alerts if a.state.value == state]
        return _json(200, {"alerts": [a.model_dump(mode="json") for a in alerts]})

    async def get_jobs(request: Request) -> Response:
        return _json(200, {"jobs": [_job_summary(hd, j.name) for j in hd.store]})

    async def get_job(request: Request) -> Response:
        name = request.path_params["job"]
        if name not in hd.store.jobs:
            return _json(404, {"error": f"no job named {name!r}"})
        job = hd.store.jobs[name]
        out = _job_summary(hd, name)
        out["attach"] = job.attach.model_dump(mode="json") if job.attach else None
        return _json(200, out)

    async def get_series(request: Request) -> Response:
        name = request.path_params["job"]
        series = job_series(hd.store, hd.engine, name)
        if series is None:
            return _json(404, {"error": f"no job named {name!r}"})
        return _json(200, series)

    async def status_page(request: Request) -> Response:
        return HTMLResponse(render_status_page(hd.store, hd.engine, hd.clock()))

    async def metrics(request: Request) -> Response:
        # The format Prometheus asks for (it prefers OpenMetrics), chosen as prometheus_client's own
        # handlers choose it; gzip when accepted (Prometheus always sends Accept-Encoding: gzip).
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        compress = gzip_accepted(request.headers.get("accept-encoding", ""))
        families = await _collect(hd)
        body = await asyncio.to_thread(_encode, families, encoder, compress)
        headers = {"Content-Encoding": "gzip"} if compress else None
        return Response(body, headers=headers, media_type=content_type)

    async def healthz(request: Request) -> Response:
        # Cheap at any size (unlike /metrics): what a probe or a load test can poll every second.
        since = hd.queue.oldest_since()
        return _json(200, {"status": "ok", "jobs": len(hd.store.jobs),
                           "rank_evaluations_pending": len(hd.queue),
                           "rank_evaluation_delay_seconds": 0.0 if since is None else max(0.0, hd.clock() - since),
                           "rule_evaluations_total": hd.engine.evaluation_count,
                           "rank_checkpoints_shed_total": hd.queue.shed_total})

    openapi = json.dumps(openapi_document()).encode()

    async def get_openapi(request: Request) -> Response:
        return Response(openapi, media_type="application/json")

    return [
        Route("/v1/alerts", get_alerts, methods=["GET"]),
        Route("/v1/jobs", get_jobs, methods=["GET"]),
        Route("/v1/jobs/{job:path}/series", get_series, methods=["GET"]),
        Route("/v1/jobs/{job:path}", get_job, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/", status_page, methods=["GET"]),
        Route("/openapi.json", get_openapi, methods=["GET"]),
    ]


async def http_error(request: Request, exc: Exception) -> Response:
    # Every answer of the API is JSON, the router's own 404/405 included (the OpenAPI document says so).
    assert isinstance(exc, HTTPException)
    response = _json(exc.status_code, {"error": exc.detail})
    response.headers.update(exc.headers or {})  # a 405's Allow
    return response


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
        # Named streams (attach(stream=...)): each its own ranks and steps; the fields above are the unnamed one's.
        "streams": {k: {"ranks": sorted(sub.ranks), "last_step": max(
            (st.last_step.step for st in sub.ranks.values() if st.last_step), default=None)}
            for k, sub in sorted(job.streams.items())},
    }


async def _collect(hd: Healthd) -> list[Metric]:
    """The exposition's metric families, collected on the event loop (they read the store, which only
    the loop changes) in slices that let waiting requests in every ``_SLICE_SECONDS``: at 2,048 ranks
    collecting takes tens of milliseconds. The families are snapshots: encoding them can happen elsewhere."""
    families: list[Metric] = []

    def collect() -> Iterator[None]:
        for family in hd.collector.collect_in_slices():
            if family is not None:
                families.append(family)
            yield None

    await in_slices(collect())
    return families


def _encode(families: list[Metric], encoder: Callable[[Collector], bytes], compress: bool) -> bytes:
    """The response body, by prometheus_client's encoder (run in a worker thread: at 2,048 ranks it is
    ~4 MiB of text, and encoding it on the event loop held every client's ingest for most of a second)."""
    body = encoder(Collected(families))
    return gzip.compress(body) if compress else body

