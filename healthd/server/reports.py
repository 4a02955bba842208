"""``POST /v1/reports``, the hot path: every rank's every flush comes through here.

``Reports.answer`` hands a request's whole body to ``Healthd.ingest`` and encodes the answer (the 200
answer for ``n`` reports with no firing alert to tell is encoded once; one that carries alerts is
encoded per request, since they change). It checks neither the token nor the body's size:
``healthd.server.gate.Gate`` did both before any route (``healthd.server.serving``). The request's
``X-Healthd-Job`` header, when sent, goes with the body: every report must belong to that job.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from healthd.exposition.collector import Counters
from healthd.server.pipeline import Healthd
from healthd.wire.schema import JOB_HEADER

JOB_HEADER_KEY = JOB_HEADER.lower().encode()  # ASGI header names are lower-case bytes

_ALERTS = {"alerts"}  # left out of an answer when empty: "nothing fires" is its absence


class Reports:
    """The report endpoint of one instance: ``answer`` (what granian's RSGI door calls) and, as an
    ASGI app, the router's ``POST /v1/reports`` (the ASGI door, under a root path too)."""

    def __init__(self, hd: Healthd) -> None:
        self.hd = hd
        self._accepted: dict[int, bytes] = {}  # n -> the 200 body; n <= limits.max_reports_per_request

    def answer(self, body: bytes, job: str | None = None) -> tuple[int, bytes]:
        """Ingest a request's whole body; returns the HTTP status and the JSON answer. ``job``: the
        request's ``X-Healthd-Job`` header, None when absent (``Healthd.ingest`` checks it)."""
        hd = self.hd
        status, result = hd.ingest(body, job)
        Counters.inc(hd.counters.requests, str(status))
        if not result.alerts:  # the answer of a client that predates alerts, byte for byte
            if status == 200:
                answer = self._accepted.get(result.accepted)
                if answer is None:
                    answer = self._accepted[result.accepted] = result.model_dump_json(exclude=_ALERTS).encode()
                return status, answer
            return status, result.model_dump_json(exclude=_ALERTS).encode()
        return status, result.model_dump_json().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        while True:  # the ASGI door gives the body, already read within the limit, in one message
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing was applied, nothing to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        job = next((v.decode("latin-1") for k, v in scope["headers"] if k == JOB_HEADER_KEY), None)
        status, body = self.answer(b"".join(chunks), job)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
