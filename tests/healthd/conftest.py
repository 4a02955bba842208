from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live import LiveHealthd, live_healthd


@pytest.fixture
def healthd_server() -> Iterator[LiveHealthd]:
    with live_healthd() as live:
        yield live
