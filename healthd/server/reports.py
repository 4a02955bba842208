"""``POST /v1/reports``, the hot path: every rank's every flush comes through here.

``ReportsEndpoint`` is a plain ASGI app (no Starlette Request/Response objects; the 200 answer for
``n`` reports is encoded once) that hands the body to ``Healthd.ingest``. ``ReportsFirst`` routes the
request to it ahead of Starlette's router, inside the authentication middleware.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from healthd.exposition.collector import Counters
from healthd.server.auth import authorized, expected_authorization
from healthd.server.pipeline import Healthd


def _announced_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """A request's ``Content-Length`` (header names lower-case); None when absent or not a number."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class ReportsEndpoint:
    """``POST /v1/reports`` as a plain ASGI app: the hot path (every rank's every flush), so it skips
    Starlette's Request and Response objects; the 200 answer for ``n`` reports is encoded once.
    Under ``healthd.server.serving``'s protocol most requests skip ASGI too: ``direct`` and ``answer``."""

    path = b"/v1/reports"  # what ``direct`` serves (healthd.server.serving.DirectPost)

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
        ``healthd.server.serving`` calls for a request it answers without an ASGI task (``direct``)."""
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
        ``answer`` directly (``healthd.server.serving.DirectPost``): its body announces a length within
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

