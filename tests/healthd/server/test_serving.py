"""healthd.server.serving: one socket write per response, ingest answered without an ASGI task, and HTTP
over it still HTTP.

The transport is tested against a recording transport on a real event loop (what reaches the
socket, and when); the protocol against a real uvicorn server (``healthd.server.embedded`` runs it) with
raw sockets: keep-alive, pipelining, ``Connection: close``, a large response read slowly, and which
requests the protocol answers itself (a counting ``DirectPost`` around the app's own) and which
the app, each answered as the app would.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from healthd.server.embedded import Embedded, serve_in_thread
from healthd.server.serving import DirectPost, GatheringHttpToolsProtocol, GatheringTransport
from healthd.settings import Settings


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


# ------------------------------------------------------------------ ingest answered by the protocol


class Counting:
    """The app's ``DirectPost``, counting the requests the protocol answered through it; ``fail``:
    answering raises, as a bug in ingest would."""

    def __init__(self, inner: DirectPost) -> None:
        self.inner = inner
        self.path = inner.path
        self.answered = 0
        self.fail = False

    def direct(self, headers: list[tuple[bytes, bytes]]) -> bool:
        return self.inner.direct(headers)

    def answer(self, body: bytes) -> tuple[int, bytes]:
        self.answered += 1
        if self.fail:
            raise RuntimeError("a bug in ingest")
        return self.inner.answer(body)


@pytest.fixture
def counted(server: Embedded) -> Iterator[Counting]:
    """Connections opened while it is installed answer through it (a protocol finds the app's
    ``state.direct_post`` when its connection is made)."""
    spy = Counting(server.app.state.direct_post)
    server.app.state.direct_post = spy
    yield spy
    server.app.state.direct_post = spy.inner


def _connect(server: Embedded) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_report_batch_is_answered_directly_with_the_response_the_app_would_send(
        server: Embedded, counted: Counting) -> None:
    with _connect(server) as sock:
        f = sock.makefile("rb")
        sock.sendall(_request("/v1/reports", _batch("direct", 0, 1)))
        direct = _read_response(f)
        assert counted.answered == 1
        sock.sendall(_request("/v1/reports?via=app", _batch("direct", 2, 3)))  # a query string: the app's way
        via_app = _read_response(f)
        assert counted.answered == 1
    assert direct[0] == via_app[0] == 200 and direct[2] == via_app[2] == b'{"accepted":2,"rejected":[]}'
    assert list(direct[1]) == list(via_app[1]) == ["date", "server", "content-type", "content-length"]
    assert {k: v for k, v in direct[1].items() if k != "date"} == {k: v for k, v in via_app[1].items() if k != "date"}
    assert server.hd.store.jobs["direct"].ranks[0].steps_total == 4


def test_a_malformed_batch_answered_directly_gets_the_apps_400(server: Embedded, counted: Counting) -> None:
    with _connect(server) as sock:
        f = sock.makefile("rb")
        sock.sendall(_request("/v1/reports", b"{not json"))
        status, headers, body = _read_response(f)
    assert counted.answered == 1
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["rejected"][0]["errors"][0]["type"] == "json_invalid"


def test_requests_pipelined_around_one_in_the_app_are_answered_in_order(server: Embedded, counted: Counting) -> None:
    with _connect(server) as sock:
        f = sock.makefile("rb")
        # A GET (the app's) with a batch behind it in one packet: the batch waits its turn in the app.
        sock.sendall(_request("/healthz", method="GET") + _request("/v1/reports", _batch("order", 0)))
        healthz, behind = _read_response(f), _read_response(f)
        assert json.loads(healthz[2])["status"] == "ok"
        assert behind[::2] == (200, b'{"accepted":1,"rejected":[]}')
        assert counted.answered == 0
        # A batch, then a GET: the batch is answered directly, the GET after it.
        sock.sendall(_request("/v1/reports", _batch("order", 1, 2)) + _request("/healthz", method="GET"))
        first, second = _read_response(f), _read_response(f)
        assert first[::2] == (200, b'{"accepted":2,"rejected":[]}') and json.loads(second[2])["status"] == "ok"
        assert counted.answered == 1


def test_a_body_arriving_in_pieces_is_answered_once_whole(server: Embedded, counted: Counting) -> None:
    request = _request("/v1/reports", _batch("pieces", 0, 1, 2))
    head_end = request.index(b"\r\n\r\n") + 4
    with _connect(server) as sock:
        f = sock.makefile("rb")
        for part in (request[:head_end - 10], request[head_end - 10:head_end + 20], request[head_end + 20:]):
            sock.sendall(part)
            time.sleep(0.02)  # separate segments, each its own data_received
        assert _read_response(f)[::2] == (200, b'{"accepted":3,"rejected":[]}')
    assert counted.answered == 1


def test_http_1_0_and_connection_close_are_answered_directly_then_closed(server: Embedded, counted: Counting) -> None:
    body = _batch("close", 0)
    for request in (_request("/v1/reports", body, close=True),
                    _request("/v1/reports", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)):
        with _connect(server) as sock:
            sock.sendall(request)
            head, _, answer = _until_closed(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"\r\nconnection: close" in head
        assert answer == b'{"accepted":1,"rejected":[]}'
    assert counted.answered == 2


def test_expect_continue_chunked_and_oversized_bodies_go_through_the_app(server: Embedded, counted: Counting) -> None:
    body = _batch("app-way", 0)
    with _connect(server) as sock:
        f = sock.makefile("rb")
        head = _request("/v1/reports", body)[:-len(body) - 2] + b"expect: 100-continue\r\n\r\n"
        sock.sendall(head)
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        sock.sendall(body)
        assert _read_response(f)[::2] == (200, b'{"accepted":1,"rejected":[]}')
        chunked = _batch("app-way", 1)
        sock.sendall(b"POST /v1/reports HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(chunked) + chunked + b"\r\n0\r\n\r\n")
        assert _read_response(f)[::2] == (200, b'{"accepted":1,"rejected":[]}')
        too_long = server.hd.settings.limits.max_body_bytes + 1
        sock.sendall(f"POST /v1/reports HTTP/1.1\r\nhost: x\r\ncontent-length: {too_long}\r\n\r\n".encode())
        status, _, answer = _read_response(f)
    assert status == 413 and b"limits.max_body_bytes" in answer
    assert counted.answered == 0
    assert server.hd.store.jobs["app-way"].ranks[0].steps_total == 2


def test_an_exception_while_answering_directly_is_a_500_and_the_connection_serves_on(
        server: Embedded, counted: Counting) -> None:
    with _connect(server) as sock:
        f = sock.makefile("rb")
        counted.fail = True
        sock.sendall(_request("/v1/reports", _batch("fails", 0)))
        status, headers, answer = _read_response(f)
        assert (status, headers["content-type"], answer) == (500, "text/plain; charset=utf-8",
                                                              b"Internal Server Error")
        counted.fail = False
        sock.sendall(_request("/v1/reports", _batch("fails", 1)))
        assert _read_response(f)[::2] == (200, b'{"accepted":1,"rejected":[]}')
    assert counted.answered == 2


def test_only_a_request_with_the_bearer_token_is_answered_directly() -> None:
    with serve_in_thread(Settings.from_mapping({"auth": {"token": "s3cret"}})) as e:
        spy = Counting(e.app.state.direct_post)
        e.app.state.direct_post = spy
        body = _batch("auth", 0)
        with _connect(e) as sock:
            f = sock.makefile("rb")
            for token, status in (("s3cret", 200), ("wrong", 401), (None, 401)):
                request = _request("/v1/reports", body)
                if token is not None:
                    request = request.replace(b"\r\n\r\n", f"\r\nauthorization: Bearer {token}\r\n\r\n".encode(), 1)
                sock.sendall(request)
                assert _read_response(f)[0] == status
        assert spy.answered == 1
        assert e.hd.counters.unauthorized == 2
        assert e.hd.store.jobs["auth"].ranks[0].steps_total == 1


def test_a_direct_request_whose_body_is_arriving_at_shutdown_is_answered_then_closed() -> None:
    with serve_in_thread() as e:
        port = int(e.url.rsplit(":", 1)[1])
        request = _request("/v1/reports", _batch("shutdown", 0))
        with _connect(e) as sock:
            sock.sendall(request[:-5])
            e.server.should_exit = True
            while True:  # uvicorn closes its listener, then asks every connection to shut down
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    break
                time.sleep(0.02)
            sock.sendall(request[-5:])
            head, _, answer = _until_closed(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"\r\nconnection: close" in head
        assert answer == b'{"accepted":1,"rejected":[]}'
