"""How healthd is served: ``HealthdApp``'s two doors, and ``serve`` (granian's RSGI server).

``healthd serve``, ``healthd.server.embedded`` and the ingest benchmark run ``serve``: granian
(a Rust HTTP server) calling ``HealthdApp.__rsgi__``, granian's own interface (RSGI, its documented
fast path, https://github.com/emmett-framework/granian/blob/master/docs/spec/RSGI.md). There a report
batch costs one call with the whole body and one ``response_bytes``: no ASGI message dicts, no
middleware stack, no per-request Task of ours. ``bench/ingest.py`` measured it against uvicorn with
its own httptools protocol and against the custom uvicorn protocol this replaces (docs/benchmarks.md).

Every request, through either door, first passes ``healthd.server.gate.Gate`` (bearer token, body
size), then gets its whole body (read within the limit), then its route: ``POST /v1/reports`` goes to
``Reports.answer`` directly at the RSGI door; everything else (and, at the ASGI door, everything) to
the Starlette router, which has no authentication of its own to forget or to duplicate.

The ASGI door (``HealthdApp.__call__``) is the same app for in-process tests (Starlette's TestClient,
httpx's ASGITransport) and for anyone who runs healthd under another ASGI server.

What healthd uses of granian: the RSGI interface (its spec) and ``granian.server.embed.Server``
(constructor, ``on_startup``, ``serve``, ``stop``), the one granian server that runs an app object on
a loop of ours, in this process; healthd's state lives in the process, so it cannot use the
multi-process ``Granian`` class, which imports its app by name in worker processes. granian logs that
server as "experimental" at start: a granian upgrade is checked by this package's tests
(tests/healthd/server/test_serving.py, test_gate.py) and ``bench/ingest.py`` before the pin moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.routing import BaseRoute
from starlette.types import Message, Receive, Scope, Send

from healthd.server.gate import JSON, Gate
from healthd.server.lifecycle import Lifecycle
from healthd.server.reports import Reports
from healthd.wire.schema import JOB_HEADER

log = logging.getLogger(__name__)

REPORTS_PATH = "/v1/reports"
JOB_HEADER_KEY_STR = JOB_HEADER.lower()  # RSGI header names are lower-case


class RsgiHeaders(Protocol):
    """The part of granian's ``RSGIHeaders`` used here (header names lower-case)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def items(self) -> list[tuple[str, str]]: ...


class RsgiScope(Protocol):
    """The part of an RSGI HTTP scope used here (RSGI spec, "HTTP scope")."""

    proto: str
    http_version: str
    method: str
    path: str
    query_string: str
    scheme: str
    client: str
    server: str

    @property
    def headers(self) -> RsgiHeaders: ...


class RsgiStream(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...


class RsgiProtocol(Protocol):
    """The part of an RSGI HTTP protocol used here (RSGI spec, "HTTP protocol")."""

    def __aiter__(self) -> Any: ...

    async def client_disconnect(self) -> None: ...

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> RsgiStream: ...


class HealthdApp:
    """One healthd instance as an application: RSGI (``__rsgi__``) and ASGI (``__call__``), both
    behind one ``Gate``. ``state`` is the router's (``state.healthd``, ``state.alertmanager``)."""

    def __init__(self, router: Starlette, gate: Gate, reports: Reports, lifecycle: Lifecycle) -> None:
        self.router = router
        self.gate = gate
        self.reports = reports
        self.lifecycle = lifecycle

    @property
    def state(self) -> State:
        return self.router.state

    @property
    def routes(self) -> list[BaseRoute]:
        """Every route a request can reach (through ``Gate``): the router's; ``POST /v1/reports`` is one."""
        return self.router.routes

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """The background loops run while inside (``healthd.server.lifecycle``)."""
        self.lifecycle.start()
        try:
            yield
        finally:
            await self.lifecycle.stop()

    # ------------------------------------------------------------------ RSGI

    async def __rsgi__(self, scope: RsgiScope, proto: RsgiProtocol) -> None:
        if scope.proto != "http":  # no websockets here; granian is started without them
            return
        headers = scope.headers
        refusal = self.gate.check(scope.path, headers.get("authorization", "").encode("latin-1", "replace"),
                                  headers.get("content-length"))
        if refusal is None:
            body = await self._read_rsgi(proto)
            if body is None:
                refusal = self.gate.too_large()
            elif scope.method == "POST" and scope.path == REPORTS_PATH:
                try:
                    status, answer = self.reports.answer(body, headers.get(JOB_HEADER_KEY_STR))
                except Exception:  # a bug in ingest: logged, a 500, the connection kept (as the router would)
                    log.exception("Exception in the application")
                    proto.response_bytes(500, [("content-type", "text/plain; charset=utf-8")], b"Internal Server Error")
                    return
                proto.response_bytes(status, [("content-type", JSON)], answer)
                return
            else:
                await self._asgi_from_rsgi(scope, proto, body)
                return
        proto.response_bytes(refusal.status, [("content-type", JSON), *refusal.headers], refusal.body)

    async def _read_rsgi(self, proto: RsgiProtocol) -> bytes | None:
        """The whole body; None when it grows past ``limits.max_body_bytes`` (what came is dropped)."""
        chunks: list[bytes] = []
        size, limit = 0, self.gate.max_body
        async for chunk in proto:
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _asgi_from_rsgi(self, scope: RsgiScope, proto: RsgiProtocol, body: bytes) -> None:
        """Serve a request whose body was read by the RSGI door through the Starlette router."""
        client_host, _, client_port = scope.client.rpartition(":")
        server_host, _, server_port = scope.server.rpartition(":")
        asgi_scope: Scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": scope.http_version,
            "method": scope.method, "scheme": scope.scheme, "path": scope.path,
            "raw_path": scope.path.encode(), "query_string": scope.query_string.encode("latin-1"),
            "root_path": "", "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in scope.headers.items()],
            "client": (client_host, int(client_port or 0)), "server": (server_host, int(server_port or 0)),
        }
        answered = _RsgiResponse(proto)
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await proto.client_disconnect()
            return {"type": "http.disconnect"}

        try:
            await self.router(asgi_scope, receive, answered.send)
        except Exception:
            log.exception("Exception in the application")
            if answered.status is None:
                proto.response_bytes(500, [("content-type", "text/plain; charset=utf-8")], b"Internal Server Error")

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan: the router runs ``lifespan`` above
            await self.router(scope, receive, send)
            return
        authorization, length = b"", None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-length":
                length = value.decode("latin-1")
        refusal = self.gate.check(scope["path"], authorization, length)
        if refusal is None:
            body = await self._read_asgi(receive)
            if body is None:
                refusal = self.gate.too_large()
            else:
                await self.router(scope, _replay(body, receive), send)
                return
        await send({"type": "http.response.start", "status": refusal.status, "headers": [
            (b"content-type", JSON.encode()), *((k.encode(), v.encode()) for k, v in refusal.headers),
            (b"content-length", b"%d" % len(refusal.body))]})
        await send({"type": "http.response.body", "body": refusal.body})

    async def _read_asgi(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size, limit = 0, self.gate.max_body
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""  # the client went away: the route answers an empty body to no one
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the already-read body once, then waits for the disconnect."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _RsgiResponse:
    """ASGI ``send`` onto an RSGI protocol: one ``response_bytes`` for a response in one body
    message (Starlette's ``Response``), a stream otherwise."""

    def __init__(self, proto: RsgiProtocol) -> None:
        self.proto = proto
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.stream: RsgiStream | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            assert self.status is not None
            body, more = message.get("body", b""), message.get("more_body", False)
            if self.stream is None and not more:
                self.proto.response_bytes(self.status, self.headers, body)
                return
            if self.stream is None:
                self.stream = self.proto.response_stream(self.status, self.headers)
            if body:
                await self.stream.send_bytes(body)


# ---------------------------------------------------------------------- running it


@dataclass(frozen=True)
class Listen:
    """Where and how ``serve`` listens: ``healthd serve``'s flags."""

    host: str = "127.0.0.1"
    port: int = 9184
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    access_log: bool = False
    log_level: str = "info"


# Close to uvicorn's access line, which healthd's logs had before granian: client - "METHOD path HTTP/v" status
# (granian's log record has the query string apart, without its '?'; uvicorn's reason phrase is not in it)
ACCESS_LOG_FORMAT = '%(addr)s - "%(method)s %(path)s %(protocol)s" %(status)d'


async def serve(app: HealthdApp, listen: Listen, stop: asyncio.Event,
                started: Callable[[], None] = lambda: None) -> None:
    """Run ``app`` on granian until ``stop`` is set: the lifespan first (background loops), then the
    server; at the end in-flight requests finish, then the lifespan's stop settles and persists.
    ``started`` is called once the port accepts connections."""
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    async with app.lifespan():
        server = Server(
            app, address=listen.host, port=listen.port, interface=Interfaces.RSGI, http=HTTPModes.http1,
            websockets=False, log_level=LogLevels(listen.log_level.lower()),
            log_access=listen.access_log, log_access_format=ACCESS_LOG_FORMAT,
            ssl_key=Path(listen.ssl_keyfile) if listen.ssl_keyfile else None,
            ssl_cert=Path(listen.ssl_certfile) if listen.ssl_certfile else None)
        listening = asyncio.Event()
        server.on_startup(listening.set)  # granian's hook: its socket is bound and listening
        task = asyncio.create_task(server.serve())
        waiting = asyncio.create_task(listening.wait())
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            waiting.cancel()
            await task  # it ended before listening: its error
            raise RuntimeError("granian exited before listening")
        started()
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.stop()
        stopping.cancel()
        await task


def run(app: HealthdApp, listen: Listen) -> None:
    """``serve`` on this thread's own event loop (uvloop when installed, as before) until SIGTERM or SIGINT."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(app, listen, stop)

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
