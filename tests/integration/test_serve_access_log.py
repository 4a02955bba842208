"""``healthd serve --access-log``: every request gets an access line (granian's, in uvicorn's shape:
healthd.server.serving.ACCESS_LOG_FORMAT), the report batches the RSGI door answers itself as much as
those the router answers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.integration.healthd_process import HealthdProcess

pytestmark = pytest.mark.integration


def test_access_log_has_a_line_for_every_request(tmp_path: Path) -> None:
    hd = HealthdProcess(tmp_path, extra_args=("--access-log", "--log-level", "info"))
    hd.start()
    try:
        batch = {"schema_version": 1, "reports": [{"kind": "step", "job": "logged", "rank": 0, "time": 1.0,
                                                   "step": 0, "loss": 1.0}]}
        with httpx.Client(base_url=hd.url, timeout=10) as client:
            assert client.post("/v1/reports", content=json.dumps(batch)).status_code == 200  # the RSGI door's own
            assert client.post("/v1/reports", content=b"{").status_code == 400
            assert client.get("/v1/reports").status_code == 405  # the router's
            assert client.get("/v1/jobs").status_code == 200
        hd.terminate()  # exited: the log is complete
        lines = [line for line in hd.log().splitlines() if '" ' in line and "HTTP/1.1" in line]
    finally:
        hd.stop()
    assert [line.split(" - ", 1)[1].strip() for line in lines if "/healthz" not in line] == [
        '"POST /v1/reports HTTP/1.1" 200', '"POST /v1/reports HTTP/1.1" 400',
        '"GET /v1/reports HTTP/1.1" 405', '"GET /v1/jobs HTTP/1.1" 200']
