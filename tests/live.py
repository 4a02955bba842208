"""A real healthd (granian, RSGI) on 127.0.0.1 and a free port, for tests: healthd.server.embedded plus HTTP helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from healthd.server.embedded import Embedded, free_port, serve_in_thread
from healthd.settings import Settings

__all__ = ["LiveHealthd", "free_port", "live_healthd"]


class LiveHealthd(Embedded):
    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=10, **kw)


@contextmanager
def live_healthd(settings: Settings | None = None, **create_kw: Any) -> Iterator[LiveHealthd]:
    with serve_in_thread(settings, **create_kw) as e:
        yield LiveHealthd(e.url, e.app, e.loop, e.stop_event)
