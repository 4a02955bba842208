"""A real healthd (uvicorn) on 127.0.0.1 and a free port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from healthd.app import create_app
from healthd.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveHealthd:
    url: str
    app: object
    server: uvicorn.Server

    @property
    def hd(self):  # noqa: ANN201 - the Healthd instance behind the app
        return self.app.state.healthd  # type: ignore[attr-defined]

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)  # type: ignore[arg-type]

    def post(self, path: str, **kw: object) -> httpx.Response:
        return httpx.post(self.url + path, timeout=10, **kw)  # type: ignore[arg-type]


@contextmanager
def live_healthd(settings: Settings | None = None, **create_kw: object) -> Iterator[LiveHealthd]:
    port = free_port()
    settings = (settings or Settings()).model_copy(update={"port": port})
    app = create_app(settings, **create_kw)  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("healthd did not start")
        time.sleep(0.02)
    try:
        yield LiveHealthd(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
