"""GET /metrics: prometheus_client's own encoders chosen by Accept, gzip by Accept-Encoding, and a scrape
that changes nothing (expiry is the tick's)."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import pickle
from collections.abc import Iterable
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from healthd.exposition import catalog as C
from healthd.server.app import create_app
from healthd.server.pipeline import Healthd
from healthd.settings import Settings
from tests.live import live_healthd

# What Prometheus 2.42 (the one the integration tests run) sends with each scrape.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _batch(reports: Iterable[dict[str, Any]]) -> bytes:
    return json.dumps({"schema_version": 1, "reports": list(reports)}).encode()


def _reports(job: str, t: float, steps: range, *, nan_at: int | None = None) -> list[dict[str, Any]]:
    """Two ranks' steps, layers, an eval and a GPU sample: every family of the exposition has samples."""
    out: list[dict[str, Any]] = [{"kind": "attach", "job": job, "rank": r, "time": t, "world_size": 2} for r in (0, 1)]
    for i in steps:
        for r in (0, 1):
            out.append({"kind": "step", "job": job, "rank": r, "time": t, "step": i,
                        "loss": math.nan if i == nan_at else 2.0 - 0.01 * i, "grad_norm": 1.0 + r,
                        "grad_norm_local": 1.3, "grad_norm_allreduced": 1.0, "batch_size": 32,
                        "step_seconds": 0.1, "update_ratio": 1e-3, "lr": [0.1, 0.01],
                        "layers": {"fc1": {"grad_norm": 0.5, "update_ratio": 1e-3, "param_norm": 3.0}}})
    out.append({"kind": "eval", "job": job, "rank": 0, "time": t, "step": steps[-1], "loss": 1.5, "accuracy": 0.5})
    out.append({"kind": "gpu", "job": job, "rank": 0, "time": t, "gpu": 0, "uuid": "GPU-0", "hostname": "node-1",
                "memory_used_bytes": 10**10, "memory_total_bytes": 8 * 10**10, "utilization_gpu_ratio": 0.9,
                "temperature_celsius": 60.0, "throttle_reasons": ["sw_thermal_slowdown"]})
    return out


Samples = dict[tuple[str, str, str], list[tuple[str, tuple[tuple[str, str], ...], str]]]


def _samples(families: Iterable[Metric]) -> Samples:
    """Families as comparable values: (name, type, help) -> samples (name, labels, value as text, NaN == NaN)."""
    return {(f.name, f.type, f.documentation): sorted((s.name, tuple(sorted(s.labels.items())), repr(float(s.value)))
                                                      for s in f.samples)
            for f in families}


# ------------------------------------------------------------------ formats

@pytest.fixture(scope="module")
def served() -> Iterable[tuple[str, Healthd]]:
    """A real server holding two jobs (one with a firing alert); its clock stands still, so every scrape
    of it reads the same."""
    now = 1000.0
    # No tick during the tests (job rules would count evaluations between a scrape and its reference).
    with live_healthd(Settings.from_mapping({"engine": {"tick_seconds": 3600}}), clock=lambda: now) as live:
        assert live.post("/v1/reports", content=_batch(_reports("run-1", now, range(12), nan_at=11))).status_code == 200
        assert live.post("/v1/reports", content=_batch(_reports("run-2", now, range(5)))).status_code == 200
        yield live.url, live.hd


def _get(url: str, **headers: str) -> httpx.Response:
    # httpx sends Accept-Encoding: gzip by default; each test says what it accepts.
    return httpx.get(url + "/metrics", headers={"Accept-Encoding": "identity", **headers}, timeout=30)


def test_plain_text_is_what_generate_latest_writes_for_the_registry(served: tuple[str, Healthd]) -> None:
    url, hd = served
    for headers in ({}, {"Accept": "text/plain;version=0.0.4"}, {"Accept": "*/*"}):
        r = _get(url, **headers)
        assert r.status_code == 200 and "content-encoding" not in r.headers
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert r.content == generate_latest(hd.registry)  # byte for byte what the hand-written formatter wrote
    parsed = _samples(text_string_to_metric_families(r.text))
    assert parsed == _samples(hd.collector.collect())
    assert {C.LOSS.name, C.ALERT.name, C.GPU_MEMORY_USED.family_name, C.LAYER_GRAD_NORM.name} <= {k[0] for k in parsed}


def test_openmetrics_when_asked_for_as_prometheus_asks(served: tuple[str, Healthd]) -> None:
    url, hd = served
    r = _get(url, Accept=PROMETHEUS_ACCEPT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.text.endswith("# EOF\n")
    assert _samples(openmetrics_families(r.text)) == _samples(hd.collector.collect())


def test_gzip_when_accepted_decompresses_to_the_same_text(served: tuple[str, Healthd]) -> None:
    url, _ = served
    for accept in ("text/plain;version=0.0.4", PROMETHEUS_ACCEPT):
        plain = _get(url, Accept=accept)
        with httpx.stream("GET", url + "/metrics", headers={"Accept": accept, "Accept-Encoding": "gzip"},
                          timeout=30) as r:
            raw = b"".join(r.iter_raw())
            assert r.headers["content-encoding"] == "gzip"
            assert r.headers["content-type"] == plain.headers["content-type"]
        assert gzip.decompress(raw) == plain.content and len(raw) < len(plain.content)


# ------------------------------------------------------------------ a scrape never mutates

def _state(hd: Healthd) -> bytes:
    """Everything a scrape could change, pickled: the whole store, the queue's entries and budget, the
    engine's alert books and counters (its clock and listeners are code, not state)."""
    queue = {k: getattr(hd.queue, k) for k in type(hd.queue).__slots__ if k != "_timer"}
    engine = {k: v for k, v in vars(hd.engine).items() if k not in ("clock", "listeners")}
    return pickle.dumps((hd.store, queue, engine, vars(hd.counters)))


def test_a_scrape_changes_nothing_and_expiry_waits_for_the_tick() -> None:
    now = [1000.0]
    settings = Settings.from_mapping({"store": {"job_ttl_seconds": 100}, "engine": {"rank_rules_cpu_share": 1e-6}})
    app = create_app(settings, clock=lambda: now[0])
    hd: Healthd = app.state.healthd
    client = TestClient(app)  # not entered: no lifespan, so no ticker or sweeper runs behind the test's back
    assert client.post("/v1/reports", content=_batch(_reports("old", now[0], range(12), nan_at=11))).status_code == 200
    assert {a.job for a in hd.engine.firing()} == {"old"}  # a NaN is evaluated at once, budget or not
    now[0] += 101  # "old" is now past its TTL
    hd.queue.charge(1e6)  # the budget spent: ranks of "new" stay queued
    assert client.post("/v1/reports", content=_batch(_reports("new", now[0], range(3)))).status_code == 200
    now[0] += 62  # the window extremes of "new"'s first steps are now older than exporter.window_seconds
    assert client.post("/v1/reports", content=_batch(_reports("new", now[0], range(3, 6)))).status_code == 200
    assert len(hd.queue) == 2 and set(hd.store.jobs) == {"old", "new"}

    before = _state(hd)
    for accept in ("", PROMETHEUS_ACCEPT):
        for encoding in ("identity", "gzip"):
            r = client.get("/metrics", headers={"Accept": accept, "Accept-Encoding": encoding})
            assert r.status_code == 200 and 'job="old"' in r.text  # past its TTL, still there until the tick
    assert _state(hd) == before

    hd.tick()
    assert set(hd.store.jobs) == {"new"} and not hd.engine.firing()
    assert 'job="old"' not in client.get("/metrics").text


def test_encoding_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder (~4 MiB of text at 2,048 ranks) runs in a worker thread: while it runs, the event
    loop serves other work."""
    import threading

    from prometheus_client import exposition

    app = create_app()
    hd: Healthd = app.state.healthd
    hd.ingest(_batch(_reports("run-1", 1.0, range(3))))
    release = threading.Event()
    encoding = threading.Event()
    plain = exposition.generate_latest

    def slow_encoder(collector: Any) -> bytes:
        encoding.set()
        assert release.wait(30), "the event loop did not run while the body was being encoded"
        return plain(collector)

    async def scrape() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            task = asyncio.create_task(client.get("/metrics"))
            while not encoding.is_set():  # polls on the loop: only possible if the encoder is elsewhere
                await asyncio.sleep(0.001)
            release.set()
            return await task

    from healthd.server import routes
    monkeypatch.setattr(routes, "choose_encoder", lambda accept: (slow_encoder, exposition.CONTENT_TYPE_PLAIN_0_0_4))
    r = asyncio.run(scrape())
    assert r.status_code == 200 and r.content == generate_latest(hd.registry)
