"""How healthd runs under uvicorn: one socket write per response instead of two, and report
batches answered without an ASGI task (``GatheringHttpToolsProtocol``'s docstring says when).

uvicorn's httptools protocol writes a response's status line and headers when the app sends
``http.response.start`` and its body when the app sends ``http.response.body``: two ``send()``
system calls, two packets, and on the receiving side two wake-ups, for every ingest response of a
few dozen bytes. At ingest rates (thousands of small requests per second on one core) that second
write is a measurable share of the server's time (``bench/ingest.py``, back-to-back runs: 10-20%
more reports/s and a lower p99).

``GatheringHttpToolsProtocol`` is uvicorn's protocol with its transport wrapped in a
``GatheringTransport``: writes made during one turn of the event loop are kept and handed to the
socket as one write at the start of the next turn (what nginx's ``tcp_nopush`` does for a response's
headers and body). Everything else (reading, flow control, TLS, closing) is the real transport's;
``close`` and ``write_eof`` send what is kept first, ``abort`` drops it, as they would drop the
transport's own buffer. ``healthd serve``, ``healthd.server.embedded`` and the ingest benchmark all run it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_client_addr
from uvicorn.server import ServerState


class GatheringTransport(asyncio.Transport):
    """A transport that sends the writes of one event-loop turn as one write."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._kept: list[bytes | bytearray | memoryview] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._kept:
            self._loop.call_soon(self.flush)
        self._kept.append(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what is kept to the real transport now (called by the loop; idempotent)."""
        kept = self._kept
        if not kept:
            return
        data = kept[0] if len(kept) == 1 else b"".join(kept)
        kept.clear()
        if not self._transport.is_closing():  # the peer went away meanwhile: as a write after close, dropped
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._kept)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._kept.clear()
        self._transport.abort()

    # Everything else is the real transport's.
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()


class DirectPost(Protocol):
    """A POST endpoint the protocol answers itself, in the parser's callback, when ``direct`` says
    the request's headers allow it: found as ``app.state.direct_post`` (healthd.server.app's
    ``ReportsEndpoint``)."""

    path: bytes  # the request target it serves, exactly

    def direct(self, headers: list[tuple[bytes, bytes]]) -> bool: ...

    def answer(self, body: bytes) -> tuple[int, bytes]:
        """The request's whole body -> HTTP status and JSON answer."""
        ...


class GatheringHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a ``GatheringTransport`` (pass it as ``http=``),
    and answering the app's ``DirectPost`` requests without an ASGI task.

    The hot path of ingest is a small POST answered by synchronous code: under ASGI each one costs a
    Task, an Event, a request-response cycle, the middleware stack and four message dicts. A request
    to ``DirectPost.path`` whose headers ``direct`` accepts is answered when its body is complete,
    in ``on_message_complete``, with the response uvicorn would have written (its default headers
    included); keep-alive, the keep-alive timer and pipelining are uvicorn's as after any response.
    The access log gets the line uvicorn would write. Everything else goes the ASGI way: another path,
    a query string or another method, ``Expect: 100-continue``, a body without a length or over the
    limit, a missing or wrong bearer token (the app answers 413 or 401 and counts them), a request
    pipelined behind one still in the app, a root_path or a concurrency limit (uvicorn applies them there).
    A direct request passes none of the app's ASGI middleware: ``direct`` does what healthd's own does
    for it (authentication); middleware added to the app later would not see these requests.
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        state = getattr(config.app, "state", None)
        direct: DirectPost | None = getattr(state, "direct_post", None)
        plain = not self.root_path and self.limit_concurrency is None
        self._direct = direct if plain else None
        self._direct_body: list[bytes] | None = None  # a direct request's body so far
        self._direct_keep_alive = True
        self._direct_version = "1.1"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvicorn serves TCP here: the transport is an asyncio.Transport (typeshed types the base method wider).
        super().connection_made(GatheringTransport(cast(asyncio.Transport, transport), self.loop))

    def on_headers_complete(self) -> None:
        d = self._direct
        if (d is not None and self.url == d.path and self.parser.get_method() == b"POST"
                and not self.expect_100_continue and not self.parser.should_upgrade()
                and (self.cycle is None or self.cycle.response_complete) and d.direct(self.headers)):
            self._direct_body = []
            self._direct_version = self.parser.get_http_version()
            self._direct_keep_alive = self._direct_version != "1.0" and self.parser.should_keep_alive()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._direct_body is not None:
            self._direct_body.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        chunks = self._direct_body
        if chunks is None:
            super().on_message_complete()
            return
        self._direct_body = None
        assert self._direct is not None
        try:
            status, body = self._direct.answer(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            content_type = b"application/json"
        except Exception:  # as uvicorn would for an app that raised: logged, a 500, the connection kept
            self.logger.exception("Exception in ASGI application\n")
            status, body, content_type = 500, b"Internal Server Error", b"text/plain; charset=utf-8"
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(self.scope), "POST",
                                    self._direct.path.decode(), self._direct_version, status)
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content += (name, b": ", value, b"\r\n")
        content += (b"content-type: ", content_type, b"\r\ncontent-length: ", b"%d" % len(body), b"\r\n")
        if not self._direct_keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", body)
        self.transport.write(b"".join(content))
        if not self._direct_keep_alive:
            self.transport.close()
        self.on_response_complete()

    def shutdown(self) -> None:
        if self._direct_body is not None:  # a direct request's body is still arriving: answer it, then close
            self._direct_keep_alive = False
            return
        super().shutdown()
