"""The HTTP API and /metrics against a real server (granian, as ``healthd serve``) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from healthd.exposition import catalog as C
from healthd.server.app import create_app
from tests.live import LiveHealthd


def _batch(*reports: dict) -> bytes:
    return json.dumps({"schema_version": 1, "reports": list(reports)}).encode()


def _step(i: int, **kw) -> dict:
    return {"kind": "step", "job": "run-1", "rank": kw.pop("rank", 0), "time": 1.0, "step": i, **kw}


def scrape(live: LiveHealthd) -> dict[str, list]:
    text = live.get("/metrics").text
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_nan_survives_the_trip_and_fires_at_its_step(healthd_server: LiveHealthd) -> None:
    reports = [_step(i, loss=2.0 - 0.01 * i, grad_norm=1.0, lr=[0.1], update_ratio=1e-3) for i in range(10)]
    reports.append(_step(10, loss=math.nan, grad_norm=math.inf, nonfinite={"loss": 1, "grads": 3}))
    r = healthd_server.post("/v1/reports", content=_batch(*reports))
    assert r.status_code == 200 and r.json()["accepted"] == 11 and r.json()["rejected"] == []
    # The push's answer tells the job at once (IngestResult.alerts).
    assert [a["rule"] for a in r.json()["alerts"]] == ["NonFiniteValues"]

    alerts = healthd_server.get("/v1/alerts", params={"job": "run-1"}).json()["alerts"]
    (a,) = [a for a in alerts if a["rule"] == "NonFiniteValues"]
    assert a["state"] == "firing" and a["severity"] == "critical" and a["step"] == 10 and a["rank"] == 0
    assert math.isnan(a["evidence"]["loss"]) and a["advice"]

    m = scrape(healthd_server)
    (loss,) = m[C.LOSS.name]
    assert math.isnan(loss.value) and loss.labels == {"job": "run-1", "rank": "0", "stream": ""}
    assert m[C.STEP.name][0].value == 10
    nonfinite = {s.labels["kind"]: s.value for s in m[C.NONFINITE_TOTAL.name]}
    assert nonfinite == {"loss": 1, "grads": 3, "params": 0}
    (alert,) = m[C.ALERT.name]
    assert alert.labels == {"job": "run-1", "rule": "NonFiniteValues", "severity": "critical", "rank": "0",
                            "stream": ""}
    assert m[C.LOSS.name + "_window_max"][0].value == 2.0  # the max over the window, NaN left out
    assert m["healthd_reports_received_total"][0].labels == {"kind": "step"}


def test_bad_report_is_named_and_its_neighbours_kept(healthd_server: LiveHealthd) -> None:
    good, bad = _step(0, loss=1.0), _step(1, loss="high", colour="red")
    r = healthd_server.post("/v1/reports", content=_batch(good, bad, _step(2, loss=0.9)))
    assert r.status_code == 422
    body = r.json()
    assert body["accepted"] == 2
    (rej,) = body["rejected"]
    locs = {tuple(e["loc"]) for e in rej["errors"]}
    assert rej["index"] == 1 and ("reports", 1, "step", "loss") in locs and ("reports", 1, "step", "colour") in locs
    assert healthd_server.get("/v1/jobs/run-1").json()["last_step"] == 2


def test_unparseable_and_oversized_bodies(healthd_server: LiveHealthd) -> None:
    r = healthd_server.post("/v1/reports", content=b"{not json")
    assert r.status_code == 400 and r.json()["rejected"][0]["errors"][0]["type"] == "json_invalid"
    r = healthd_server.post("/v1/reports", content=json.dumps({"schema_version": 7, "reports": []}))
    assert r.status_code == 422 and "schema_version" in r.text
    r = healthd_server.post("/v1/reports", content=b"x" * (17 * 1024 * 1024))
    assert r.status_code == 413 and "max_body_bytes" in r.text
    assert healthd_server.get("/v1/alerts", params={"state": "bogus"}).status_code == 400


def test_a_chunked_body_is_read_whole_and_held_to_the_size_limit(healthd_server: LiveHealthd) -> None:
    body = json.dumps({"schema_version": 1, "reports": [_step(i, job="chunked") for i in range(3)]}).encode()
    r = healthd_server.post("/v1/reports", content=iter([body[:10], body[10:50], body[50:]]))  # no content-length
    assert r.status_code == 200 and r.json() == {"accepted": 3, "rejected": []}
    assert healthd_server.get("/v1/jobs/chunked").json()["last_step"] == 2
    big = iter([b"x" * (1024 * 1024)] * 17)
    r = healthd_server.post("/v1/reports", content=big)
    assert r.status_code == 413 and "max_body_bytes" in r.text


def test_per_rank_and_per_layer_series_and_expiry() -> None:
    from healthd.settings import Settings
    from tests.live import live_healthd

    now = [1000.0]
    settings = Settings.from_mapping({"store": {"job_ttl_seconds": 60}, "engine": {"tick_seconds": 0.05}})
    with live_healthd(settings, clock=lambda: now[0]) as live:
        reports = [_step(i, rank=r, loss=1.0, lr=[0.1, 0.01], batch_size=32, step_seconds=0.1 * (r + 1),
                         layers={"fc1": {"grad_norm": 0.5, "update_ratio": 1e-3}})
                   for i in range(3) for r in (0, 1)]
        assert live.post("/v1/reports", content=_batch(*reports)).status_code == 200
        m = scrape(live)
        assert {s.labels["rank"] for s in m[C.STEP_SECONDS.name]} == {"0", "1"}
        assert {(s.labels["param_group"], s.value) for s in m[C.LEARNING_RATE.name] if s.labels["rank"] == "0"} \
            == {("0", 0.1), ("1", 0.01)}
        (lg,) = m[C.LAYER_GRAD_NORM.name]
        assert lg.labels == {"job": "run-1", "layer": "fc1", "stream": ""}  # per-layer: one series per job, no rank
        assert [s.value for s in m["trainhealth_steps_total"] if s.labels["rank"] == "1"] == [3]
        now[0] += 61  # past the TTL: the server's ticker expires the job, and the next scrape has none of it
        deadline = time.monotonic() + 30
        while live.get("/v1/jobs").json()["jobs"] and time.monotonic() < deadline:
            time.sleep(0.01)
        m = scrape(live)
        assert C.STEP.name not in m and live.get("/v1/jobs").json()["jobs"] == []


def test_metrics_are_collected_in_slices_that_let_other_work_in_and_read_as_one_exposition() -> None:
    from prometheus_client import generate_latest

    from healthd.exposition.collector import Collected
    from healthd.server.pipeline import build
    from healthd.server.routes import _collect
    from healthd.settings import Settings
    from healthd.wire.schema import StepReport

    hd = build(Settings.from_mapping({"limits": {"max_ranks_per_job": 10_000}}))
    for rank in range(600):  # several slices of HealthCollector.RANKS_PER_SLICE ranks
        for i in range(3):
            hd.store.apply(StepReport(job="big", rank=rank, time=1.0, step=i, loss=2.0 - i / 10, grad_norm=1.0,
                                      lr=[1e-3], layers={}), now=time.time())
    hd.collector.clock = lambda: 2.0  # a fixed clock: both expositions see the same window extremes

    async def scrape_while_ingesting() -> tuple[bytes, int]:  # the collecting part of a scrape
        ticks = 0
        done = False

        async def other_work() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        ticks = 0
        text = generate_latest(Collected(await _collect(hd)))
        done = True
        await task
        return text, ticks

    import healthd.server.lifecycle as app_module
    slice_seconds = app_module._SLICE_SECONDS
    app_module._SLICE_SECONDS = 0.0  # yield at every pause point, whatever this machine's speed
    try:
        text, ticks = asyncio.run(scrape_while_ingesting())
    finally:
        app_module._SLICE_SECONDS = slice_seconds
    assert ticks >= 600 // hd.collector.RANKS_PER_SLICE, "the event loop ran other work during the scrape"
    assert text == generate_latest(hd.registry)
    assert text.count(b'trainhealth_loss{job="big",rank="599",stream=""}') == 1



def test_reports_skip_the_router_but_not_its_answers(healthd_server: LiveHealthd) -> None:
    # POST /v1/reports goes straight to its endpoint (the RSGI door); other methods still get the router's 405.
    r = healthd_server.get("/v1/reports")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()


def test_behind_a_root_path_the_router_serves_reports() -> None:
    async def post() -> httpx.Response:  # the ASGI door: the router strips the root path
        transport = httpx.ASGITransport(app=create_app(), root_path="/healthd")
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await client.post("/healthd/v1/reports", content=_batch(_step(0, loss=1.0), _step(1, loss=1.0)))

    r = asyncio.run(post())
    assert r.status_code == 200 and r.json() == {"accepted": 2, "rejected": []}
