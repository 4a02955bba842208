"""The read side of the API: alerts, jobs, series, the status page, ``/metrics``, health, OpenAPI.

Each handler answers from the store and the engine; the write side is ``healthd.server.reports``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from healthd.exposition.collector import exposition_text
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
    """The GET routes of one instance."""
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
    }


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

    await in_slices(render())
    return b"".join(out)


async def _settle(hd: Healthd, job: str | None = None) -> None:
    """A read answers for every step accepted before it (``Healthd.settle``, in slices)."""
    await in_slices(hd.settle_slices(job))

