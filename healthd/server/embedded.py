"""Run a real healthd (uvicorn) in a background thread: for the demo, tests and notebooks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette

from healthd.server.app import create_app
from healthd.server.pipeline import Healthd
from healthd.server.serving import GatheringHttpToolsProtocol
from healthd.settings import Settings


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Embedded:
    """A running healthd: its base URL and the in-process state behind it."""

    url: str
    app: Starlette
    server: uvicorn.Server

    @property
    def hd(self) -> Healthd:
        return self.app.state.healthd


@contextmanager
def serve_in_thread(settings: Settings | None = None, *, start_timeout_seconds: float = 20.0,
                    **create_kw: Any) -> Iterator[Embedded]:
    """Start healthd on 127.0.0.1 and a free port; stop it on exit."""
    port = free_port()
    settings = (settings or Settings()).model_copy(update={"host": "127.0.0.1", "port": port})
    app = create_app(settings, **create_kw)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           http=GatheringHttpToolsProtocol))  # as `healthd serve`
    thread = threading.Thread(target=server.run, name="healthd-embedded", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_seconds
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("embedded healthd did not start")
        time.sleep(0.02)
    try:
        yield Embedded(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
