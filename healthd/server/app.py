"""The app's assembly: ``create_app(settings, ...)`` builds a fresh, self-contained instance
(``healthd.server.serving.HealthdApp``: RSGI for granian, ASGI for tests and other servers).

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

Every route is behind ``healthd.server.gate.Gate`` (bearer token, body size), at both doors. The read
handlers are ``healthd.server.routes``; the report path ``healthd.server.reports`` and
``healthd.server.pipeline``; the background loops ``healthd.server.lifecycle``. This module only wires
them together.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from healthd.alerting.alertmanager import AlertmanagerPusher
from healthd.engine.alerts import AlertListener
from healthd.rules import ALL_RULES
from healthd.rules.base import Rule
from healthd.server.gate import Gate
from healthd.server.gc_policy import ServingGC
from healthd.server.lifecycle import Lifecycle
from healthd.server.pipeline import Healthd, build
from healthd.server.reports import Reports
from healthd.server.routes import http_error, read_routes
from healthd.server.serving import HealthdApp
from healthd.settings import Settings


def create_app(settings: Settings | None = None, *, rules: Sequence[type[Rule[Any, Any]]] = ALL_RULES,
               listeners: Iterable[AlertListener] = (), clock: Callable[[], float] = time.time,
               hd: Healthd | None = None, gc_policy: ServingGC | None = None) -> HealthdApp:
    """Build the app. Nothing is global: two apps never share state, and the process's garbage
    collector is left alone unless ``gc_policy`` is given (``healthd serve``). With ``hd`` given, its
    settings are the app's (auth and limits included); ``settings`` must then be None or the same."""
    if hd is not None:
        if settings is not None and settings != hd.settings:
            raise ValueError("create_app(settings, hd=...): the app takes its settings from hd; pass one of them")
        settings = hd.settings
    settings = settings or Settings()
    pusher = None
    if settings.alertmanager.targets and hd is None:  # direct push to Alertmanager (healthd.alerting.alertmanager)
        pusher = AlertmanagerPusher(settings.alertmanager, clock=clock,
                                    base_url=settings.public_url or f"http://{settings.host}:{settings.port}",
                                    silence_rules=[r.name for r in rules if r.fires_on_silence])
        listeners = [*listeners, pusher]
    hd = hd or build(settings, rules=rules, listeners=listeners, clock=clock)
    if pusher is not None:
        pusher.restore(hd.engine.firing())  # alerts restored from --db: kept alive in Alertmanager
    reports = Reports(hd)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:  # the ASGI door's lifespan: the app's own
        async with app.lifespan():
            yield

    router = Starlette(
        routes=[Route("/v1/reports", reports, methods=["POST"]), *read_routes(hd)],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    router.state.healthd = hd
    router.state.alertmanager = pusher
    app = HealthdApp(router, Gate(hd), reports, Lifecycle(hd, pusher=pusher, gc_policy=gc_policy))
    return app
