"""How healthd runs under uvicorn: one socket write per response instead of two.

uvicorn's httptools protocol writes a response's status line and headers when the app sends
``http.response.start`` and its body when the app sends ``http.response.body``: two ``send()``
system calls, two packets, and on the receiving side two wake-ups, for every ingest response of a
few dozen bytes. At ingest rates (thousands of small requests per second on one core) that second
write is a measurable share of the server's time (``bench/ingest.py``, back-to-back runs: 10-20%
more reports/s and a lower p99; the README's Benchmarks section has the numbers).

``GatheringHttpToolsProtocol`` is uvicorn's protocol with its transport wrapped in a
``GatheringTransport``: writes made during one turn of the event loop are kept and handed to the
socket as one write at the start of the next turn (what nginx's ``tcp_nopush`` does for a response's
headers and body). Everything else (reading, flow control, TLS, closing) is the real transport's;
``close`` and ``write_eof`` send what is kept first, ``abort`` drops it, as they would drop the
transport's own buffer. ``healthd serve``, ``healthd.embedded`` and the ingest benchmark all run it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


class GatheringHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a ``GatheringTransport`` (pass it as ``http=``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(GatheringTransport(transport, self.loop))
