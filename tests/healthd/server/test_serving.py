"""healthd.server.serving: HTTP over granian's RSGI door is still HTTP, and both doors answer alike.

Against a real server (``healthd.server.embedded`` runs ``serve``, as ``healthd serve`` does) with
raw sockets: keep-alive, pipelining, ``Connection: close``, HTTP/1.0, a body arriving in pieces, a
large response read slowly, ``Expect: 100-continue``, chunked and oversized bodies, and an exception
in ingest. The ASGI door is checked against the RSGI one on the same requests.
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

from healthd.server.app import create_app
from healthd.server.embedded import Embedded, serve_in_thread


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


def _connect(server: Embedded) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_keep_alive_and_pipelined_requests_get_their_responses_in_order(server: Embedded) -> None:
    with _connect(server) as sock:
        f = sock.makefile("rb")
        sock.sendall(_request("/v1/reports", _batch("ka", 0, 1)))
        assert _read_response(f)[::2] == (200, b'{"accepted":2,"rejected":[]}')
        # In one packet: a good batch, a malformed one, a GET (the router's), a good batch.
        sock.sendall(_request("/v1/reports", _batch("ka", 2)) + _request("/v1/reports", b"{not json")
                     + _request("/healthz", method="GET") + _request("/v1/reports", _batch("ka", 3, 4, 5)))
        first, second, third, fourth = (_read_response(f) for _ in range(4))
        assert first[::2] == (200, b'{"accepted":1,"rejected":[]}')
        assert second[0] == 400 and second[1]["content-type"] == "application/json"
        assert json.loads(second[2])["rejected"][0]["errors"][0]["type"] == "json_invalid"
        assert json.loads(third[2])["status"] == "ok"
        assert fourth[::2] == (200, b'{"accepted":3,"rejected":[]}')
    assert server.hd.store.jobs["ka"].ranks[0].steps_total == 6


def test_connection_close_and_http_1_0_get_the_whole_response_then_a_close(server: Embedded) -> None:
    body = _batch("close", 0)
    for request in (_request("/v1/reports", body, close=True),
                    _request("/v1/reports", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)):
        with _connect(server) as sock:
            sock.sendall(request)
            head, _, answer = _until_closed(sock).partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"200"
        assert answer == b'{"accepted":1,"rejected":[]}'
    assert server.hd.store.jobs["close"].ranks[0].steps_total == 2


def test_a_body_arriving_in_pieces_is_answered_once_whole(server: Embedded) -> None:
    request = _request("/v1/reports", _batch("pieces", 0, 1, 2))
    head_end = request.index(b"\r\n\r\n") + 4
    with _connect(server) as sock:
        f = sock.makefile("rb")
        for part in (request[:head_end - 10], request[head_end - 10:head_end + 20], request[head_end + 20:]):
            sock.sendall(part)
            time.sleep(0.02)  # separate segments (not an assertion on time: the answer is awaited below)
        assert _read_response(f)[::2] == (200, b'{"accepted":3,"rejected":[]}')


def test_a_large_response_read_slowly_arrives_whole(server: Embedded) -> None:
    # Enough ranks that /metrics is far larger than the socket buffers: the writer is paused by flow
    # control, and the whole body must still arrive, in order.
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


def test_expect_continue_chunked_and_oversized_bodies(server: Embedded) -> None:
    body = _batch("bodies", 0)
    limit = server.hd.settings.limits.max_body_bytes
    with _connect(server) as sock:
        f = sock.makefile("rb")
        head = _request("/v1/reports", body)[:-len(body) - 2] + b"expect: 100-continue\r\n\r\n"
        sock.sendall(head)
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        sock.sendall(body)
        assert _read_response(f)[::2] == (200, b'{"accepted":1,"rejected":[]}')
        chunked = _batch("bodies", 1)
        sock.sendall(b"POST /v1/reports HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(chunked) + chunked + b"\r\n0\r\n\r\n")
        assert _read_response(f)[::2] == (200, b'{"accepted":1,"rejected":[]}')
        sock.sendall(f"POST /v1/reports HTTP/1.1\r\nhost: x\r\ncontent-length: {limit + 1}\r\n\r\n".encode())
        status, _, answer = _read_response(f)
        assert status == 413 and b"limits.max_body_bytes" in answer
    with _connect(server) as sock:  # chunked, no length announced: over the limit while read
        f = sock.makefile("rb")
        big = b"x" * (limit + 1)
        sock.sendall(b"POST /v1/reports HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(big) + big + b"\r\n0\r\n\r\n")
        status, _, answer = _read_response(f)
        assert status == 413 and b"limits.max_body_bytes" in answer
    assert server.hd.store.jobs["bodies"].ranks[0].steps_total == 2


def test_an_exception_in_ingest_is_a_500_and_the_connection_serves_on(
        server: Embedded, monkeypatch: pytest.MonkeyPatch) -> None:
    answer = server.app.reports.answer
    calls = []

    def failing_once(body: bytes, job: str | None = None) -> tuple[int, bytes]:
        calls.append(body)
        if len(calls) == 1:
            raise RuntimeError("a bug in ingest")
        return answer(body, job)

    monkeypatch.setattr(server.app.reports, "answer", failing_once)
    with _connect(server) as sock:
        f = sock.makefile("rb")
        sock.sendall(_request("/v1/reports", _batch("fails", 0)))
        status, headers, body = _read_response(f)
        assert (status, headers["content-type"], body) == (500, "text/plain; charset=utf-8",
                                                           b"Internal Server Error")
        sock.sendall(_request("/v1/reports", _batch("fails", 1)))
        assert _read_response(f)[::2] == (200, b'{"accepted":1,"rejected":[]}')
    assert len(calls) == 2


def test_both_doors_answer_alike(server: Embedded) -> None:
    """The RSGI door (served) and the ASGI door (in process) on the same requests: status, content
    type and body; headers the servers add themselves (date, server) aside."""
    requests = [("POST", "/v1/reports", _batch("doors", 0, 1)), ("POST", "/v1/reports", b"{not json"),
                ("GET", "/v1/reports", b""), ("GET", "/v1/alerts?job=doors", b""), ("GET", "/v1/jobs/none", b""),
                ("GET", "/v1/alerts?state=bogus", b""), ("GET", "/no/such/path", b"")]

    async def via_asgi() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return [await client.request(m, p, content=b) for m, p, b in requests]

    asgi = asyncio.run(via_asgi())
    with httpx.Client(base_url=server.url, timeout=10) as client:
        rsgi = [client.request(m, p, content=b) for m, p, b in requests]
    for (method, path, _), a, r in zip(requests, asgi, rsgi, strict=True):
        assert (r.status_code, r.headers["content-type"], r.content) == \
               (a.status_code, a.headers["content-type"], a.content), (method, path)
        assert r.headers.get("allow") == a.headers.get("allow")


def test_leaving_serve_in_thread_closes_the_port() -> None:
    with serve_in_thread() as e:
        assert httpx.post(e.url + "/v1/reports", content=_batch("stop", 0), timeout=10).status_code == 200
        port = int(e.url.rsplit(":", 1)[1])
    # serve_in_thread's exit waited for the server's thread: the port is closed.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
