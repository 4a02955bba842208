"""The ASGI app's assembly: ``create_app(settings, ...)`` builds a fresh, self-contained instance.

Routes:
- ``POST /v1/reports``: a ``ReportBatch``; 200 when all reports were accepted,
  422 naming each rejected report's field (the valid ones are kept), 400 for
  an unparseable body, 413 for a body or batch over the limits (``healthd.server.reports``).
- ``GET /v1/alerts?job=J&state=firing``: alerts, resolved ones included.
- ``GET /v1/jobs`` and ``GET /v1/jobs/{job}``: what healthd knows of each job.
- ``GET /v1/jobs/{job}/series``: the job's stored windows and alerts (``healthd.exposition.series``).
- ``GET /``: a server-rendered status page (``healthd.exposition.status_page``).
- ``GET /metrics``: Prometheus exposition (private registry).
- ``GET /healthz``: liveness.

The read handlers are ``healthd.server.routes``; the report path ``healthd.server.pipeline``; the
background loops ``healthd.server.lifecycle``. This module only wires them together.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from healthd.alerting.alertmanager import AlertmanagerPusher
from healthd.engine.alerts import AlertListener
from healthd.rules import ALL_RULES
from healthd.rules.base import Rule
from healthd.server.auth import BearerAuth
from healthd.server.gc_policy import ServingGC
from healthd.server.lifecycle import Lifecycle
from healthd.server.pipeline import Healthd, build
from healthd.server.reports import ReportsEndpoint, ReportsFirst
from healthd.server.routes import count_unauthorized, http_error, read_routes
from healthd.settings import Settings


def create_app(settings: Settings | None = None, *, rules: Sequence[type[Rule[Any, Any]]] = ALL_RULES,
               listeners: Iterable[AlertListener] = (), clock: Callable[[], float] = time.time,
               hd: Healthd | None = None, gc_policy: ServingGC | None = None) -> Starlette:
    """Build the ASGI app. Nothing is global: two apps never share state, and the process's garbage
    collector is left alone unless ``gc_policy`` is given (``healthd serve``)."""
    settings = settings or Settings()
    pusher = None
    if settings.alertmanager.url and hd is None:  # direct push to Alertmanager (healthd.alerting.alertmanager)
        pusher = AlertmanagerPusher(settings.alertmanager, clock=clock,
                                    base_url=settings.public_url or f"http://{settings.host}:{settings.port}")
        listeners = [*listeners, pusher]
    hd = hd or build(settings, rules=rules, listeners=listeners, clock=clock)
    lifecycle = Lifecycle(hd, pusher=pusher, gc_policy=gc_policy)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        lifecycle.start()
        try:
            yield
        finally:
            await lifecycle.stop()

    reports = ReportsEndpoint(hd)
    app = Starlette(
        routes=[Route("/v1/reports", reports, methods=["POST"]), *read_routes(hd)],
        middleware=[Middleware(BearerAuth, settings=settings.auth, on_refused=lambda: count_unauthorized(hd)),
                    Middleware(ReportsFirst, reports=reports)],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.healthd = hd
    app.state.direct_post = reports  # healthd.server.serving answers POST /v1/reports without an ASGI task
    app.state.alertmanager = pusher
    return app
