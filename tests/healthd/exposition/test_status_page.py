"""GET / : the server-rendered status page, on a real server (granian, as `healthd serve`)."""

from __future__ import annotations

import re

from tests.healthd.run_data import JOB, post_run
from tests.live import LiveHealthd


def test_empty_status_page_says_so(healthd_server: LiveHealthd) -> None:
    r = healthd_server.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "no jobs have reported yet" in r.text


def test_status_page_lists_jobs_ranks_and_active_alerts(healthd_server: LiveHealthd) -> None:
    post_run(healthd_server)
    page = healthd_server.get("/").text
    assert f"<h2>{JOB} " in page
    assert len(re.findall(r'<tr class="rank">', page)) == 2 and "node-1" in page
    assert re.search(r'<tr class="alert" data-rule="NonFiniteValues" data-state="firing">', page)
    assert "AdamW(lr=0.001, weight_decay=0.01)" in page and "global batch 64" in page
    assert "1 alert(s) firing" in page or "2 alert(s) firing" in page
    advice = healthd_server.get("/v1/alerts", params={"job": JOB}).json()["alerts"][0]["advice"]
    assert advice[:40].replace("'", "&#x27;").replace('"', "&quot;") in page
