"""healthd.serving: one socket write per response, and HTTP over it still HTTP.

The transport is tested against a recording transport on a real event loop (what reaches the
socket, and when); the protocol against a real uvicorn server (``healthd.embedded`` runs it) with
raw sockets: keep-alive, pipelining, ``Connection: close``, a large response read slowly.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from healthd.embedded import Embedded, serve_in_thread
from healthd.serving import GatheringHttpToolsProtocol, GatheringTransport


class Recording(asyncio.Transport):
    """The real transport's side of the wrapper: what was written, and in which calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write after close" if self.closing else "write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", b""))
        self.closing = True

    def write_eof(self) -> None:
        self.calls.append(("write_eof", b""))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 7


async def _turn() -> None:
    await asyncio.sleep(0)  # one turn of the loop: callbacks scheduled before it have run


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_writes_of_one_turn_reach_the_socket_as_one_write_on_the_next() -> None:
    async def main() -> list[tuple[str, bytes]]:
        real = Recording()
        t = GatheringTransport(real, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(memoryview(b"{}"))
        assert real.calls == []  # nothing sent within the turn
        assert t.get_write_buffer_size() == 7 + 40
        await _turn()
        first = list(real.calls)
        t.writelines([b"a", b"b"])
        await _turn()
        t.write(b"c")
        await _turn()
        return first + real.calls[1:]

    assert _run(main()) == [("write", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"), ("write", b"ab"),
                            ("write", b"c")]


def test_close_and_write_eof_send_what_is_kept_first_abort_drops_it() -> None:
    async def main() -> tuple[list[tuple[str, bytes]], ...]:
        loop = asyncio.get_running_loop()
        closed, eof, aborted = Recording(), Recording(), Recording()
        for real, end in ((closed, "close"), (eof, "write_eof"), (aborted, "abort")):
            t = GatheringTransport(real, loop)
            t.write(b"body")
            getattr(t, end)()
        await _turn()  # the flush scheduled by write() finds nothing left, and writes nothing after close
        return closed.calls, eof.calls, aborted.calls

    closed, eof, aborted = _run(main())
    assert closed == [("write", b"body"), ("close", b"")]
    assert eof == [("write", b"body"), ("write_eof", b"")]
    assert aborted == [("abort", b"")]


def test_what_is_kept_when_the_peer_goes_away_is_dropped_without_an_error() -> None:
    async def main() -> list[tuple[str, bytes]]:
        real = Recording()
        t = GatheringTransport(real, asyncio.get_running_loop())
        t.write(b"late")
        real.closing = True  # connection lost before the loop's next turn
        await _turn()
        return real.calls

    assert _run(main()) == []


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def server() -> Iterator[Embedded]:
    with serve_in_thread() as e:
        yield e


def _request(path: str, body: bytes = b"", *, method: str = "POST", close: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return (head + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


def _batch(job: str, *steps: int) -> bytes:
    reports = [{"kind": "step", "job": job, "rank": 0, "time": 1.0, "step": s, "loss": 1.0, "lr": [0.01]}
               for s in steps]
    return json.dumps({"schema_version": 1, "reports": reports}).encode()


def _read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers["content-length"]))


def test_embedded_and_serve_run_the_gathering_protocol(server: Embedded) -> None:
    assert server.server.config.http_protocol_class is GatheringHttpToolsProtocol


def test_keep_alive_and_pipelined_requests_get_their_responses_in_order(server: Embedded) -> None:
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as sock:
        f = sock.makefile("rb")
        sock.sendall(_request("/v1/reports", _batch("ka", 0, 1)))
        assert _read_response(f)[::2] == (200, b'{"accepted":2,"rejected":[]}')
        # Three requests in one packet: a good batch, a malformed one, a good one.
        sock.sendall(_request("/v1/reports", _batch("ka", 2)) + _request("/v1/reports", b"{not json")
                     + _request("/v1/reports", _batch("ka", 3, 4, 5)))
        first, second, third = (_read_response(f) for _ in range(3))
        assert first[::2] == (200, b'{"accepted":1,"rejected":[]}')
        assert second[0] == 400 and b"JSON" in second[2]
        assert third[::2] == (200, b'{"accepted":3,"rejected":[]}')
    assert server.hd.store.jobs["ka"].ranks[0].steps_total == 6


def test_connection_close_sends_the_whole_response_then_closes(server: Embedded) -> None:
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(_request("/v1/reports", _batch("cc", 0), close=True))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert body == b'{"accepted":1,"rejected":[]}'


def test_a_large_response_read_slowly_arrives_whole(server: Embedded) -> None:
    # Enough ranks that /metrics is far larger than the socket buffers: flow control pauses the
    # writer, and what the wrapper hands over in one write must still all arrive, in order.
    for ranks in (range(0, 128), range(128, 256)):
        r = httpx.post(server.url + "/v1/reports", timeout=10, content=json.dumps({"schema_version": 1, "reports": [
            {"kind": "step", "job": "big", "rank": rank, "time": 1.0, "step": 0, "loss": 1.0, "grad_norm": 1.0,
             "lr": [0.01]} for rank in ranks]}))
        assert r.status_code == 200, r.text
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        sock.sendall(_request("/metrics", method="GET"))
        f = sock.makefile("rb", buffering=1024)
        status, headers, body = _read_response(f)
    assert status == 200 and len(body) == int(headers["content-length"]) > 200_000
    assert body.endswith(b"\n")
    assert body.count(b'job="big"') >= 256
