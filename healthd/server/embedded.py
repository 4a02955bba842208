"""Run a real healthd (granian, as ``healthd serve``) in a background thread: for the demo, tests and notebooks."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from healthd.server.app import create_app
from healthd.server.pipeline import Healthd
from healthd.server.serving import HealthdApp, Listen, serve
from healthd.settings import Settings


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Embedded:
    """A running healthd: its base URL and the in-process state behind it; ``stop()`` ends it
    (in-flight requests finish, then the lifespan's stop), as SIGTERM ends ``healthd serve``."""

    url: str
    app: HealthdApp
    loop: asyncio.AbstractEventLoop = field(repr=False)
    stop_event: asyncio.Event = field(repr=False)

    @property
    def hd(self) -> Healthd:
        hd: Healthd = self.app.state.healthd
        return hd

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)


@contextmanager
def serve_in_thread(settings: Settings | None = None, *, start_timeout_seconds: float = 20.0,
                    **create_kw: Any) -> Iterator[Embedded]:
    """Start healthd on 127.0.0.1 and a free port; stop it on exit."""
    port = free_port()
    if create_kw.get("hd") is not None:  # an instance built beforehand brings its own settings (create_app)
        app = create_app(**create_kw)
    else:
        app = create_app((settings or Settings()).model_copy(update={"host": "127.0.0.1", "port": port}),
                         **create_kw)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(app, Listen(host="127.0.0.1", port=port, log_level="warning"), stop,
                                          started=started.set))
        except BaseException as e:  # reported by the starting thread
            failed.append(e)
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="healthd-embedded", daemon=True)
    thread.start()
    if not started.wait(start_timeout_seconds):
        loop.call_soon_threadsafe(stop.set)
        raise RuntimeError("embedded healthd did not start") from (failed[0] if failed else None)
    try:
        yield Embedded(f"http://127.0.0.1:{port}", app, loop, stop)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
