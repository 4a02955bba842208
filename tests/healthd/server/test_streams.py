"""Named streams against a real server: separate alerts and series per (job, rank, stream), the cap on
streams per job, and a second monitor claiming a live stream refused."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from healthd.alerting.alertmanager import alert_labels
from healthd.exposition import catalog as C
from healthd.settings import Settings
from tests.live import live_healthd


def _batch(*reports: dict[str, Any]) -> bytes:
    return json.dumps({"schema_version": 1, "reports": list(reports)}).encode()


def _step(i: int, stream: str | None, **kw: Any) -> dict[str, Any]:
    return {"kind": "step", "job": "gan", "time": 1.0, "step": i, **({"stream": stream} if stream else {}), **kw}


def _attach(stream: str | None, monitor_id: str) -> dict[str, Any]:
    return {"kind": "attach", "job": "gan", "time": 1.0, "monitor_id": monitor_id,
            **({"stream": stream} if stream else {})}


def _samples(text: str, name: str) -> list[Any]:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def test_two_streams_of_one_rank_alert_separately_with_a_stream_label_and_series_of_their_own() -> None:
    with live_healthd() as live:
        nan = float("nan")
        body = _batch(*[_step(i, "discriminator", loss=nan if i >= 1 else 0.7) for i in range(3)],
                      *[_step(i, "generator", loss=1.0) for i in range(3)],
                      *[_step(i, None, loss=2.0) for i in range(3)])
        assert live.post("/v1/reports", content=body).status_code == 200
        live.app.state.healthd.settle()
        alerts = live.get("/v1/alerts", params={"job": "gan"}).json()["alerts"]
        (nf,) = [a for a in alerts if a["rule"] == "NonFiniteValues"]
        assert nf["stream"] == "discriminator" and nf["rank"] == 0
        assert nf["summary"].startswith("[stream discriminator]")
        engine_alert = next(a for a in live.app.state.healthd.engine.alerts("gan") if a.rule == "NonFiniteValues")
        assert alert_labels(engine_alert)["stream"] == "discriminator"
        text = live.get("/metrics").text
        losses = {s.labels["stream"]: s.value for s in _samples(text, C.LOSS.name) if s.labels["job"] == "gan"}
        assert losses["generator"] == 1.0 and losses[""] == 2.0 and losses["discriminator"] != losses["discriminator"]
        (firing,) = [s for s in _samples(text, C.ALERT.name) if s.labels["rule"] == "NonFiniteValues"]
        assert firing.labels["stream"] == "discriminator"
        job = live.get("/v1/jobs/gan").json()
        assert job["ranks"] == [0] and job["streams"] == {"discriminator": {"ranks": [0], "last_step": 2},
                                                          "generator": {"ranks": [0], "last_step": 2}}


def test_an_unnamed_streams_alert_has_no_stream_label() -> None:
    with live_healthd() as live:
        live.post("/v1/reports", content=_batch(_step(0, None, loss=float("nan"))))
        live.app.state.healthd.settle()
        (a,) = live.app.state.healthd.engine.alerts("gan")
        assert a.stream is None and "stream" not in alert_labels(a) and not a.summary.startswith("[stream")


def test_streams_past_the_cap_are_refused_naming_it_and_counted() -> None:
    settings = Settings.from_mapping({"limits": {"max_streams_per_job": 2}})
    with live_healthd(settings) as live:
        ok = live.post("/v1/reports", content=_batch(_step(0, "a"), _step(0, "b"), _step(0, None)))
        assert ok.status_code == 200
        r = live.post("/v1/reports", content=_batch(_step(0, "c"), _step(1, "a")))
        assert r.status_code == 422 and r.json()["accepted"] == 1
        err = r.json()["rejected"][0]["errors"][0]
        assert err["type"] == "cardinality_cap" and "limits.max_streams_per_job" in err["msg"] and "'c'" in err["msg"]
        capped = {s.labels["cap"]: s.value for s in _samples(live.get("/metrics").text,
                                                              C.CARDINALITY_REJECTIONS_TOTAL.name)}
        assert capped == {"max_streams_per_job": 1.0}


def test_a_second_monitor_on_a_live_stream_is_refused_until_the_first_closes() -> None:
    with live_healthd() as live:
        assert live.post("/v1/reports", content=_batch(_attach("disc", "m1"), _step(0, "disc"))).status_code == 200
        assert live.post("/v1/reports", content=_batch(_attach("disc", "m1"))).status_code == 200  # a resend
        r = live.post("/v1/reports", content=_batch(_attach("disc", "m2")))
        assert r.status_code == 422
        err = r.json()["rejected"][0]["errors"][0]
        assert err["type"] == "stream_in_use" and "stream 'disc'" in err["msg"] and 'stream="name"' in err["msg"]
        assert live.post("/v1/reports", content=_batch(_attach("gen", "m2"))).status_code == 200  # its own stream
        rejected = {s.labels["reason"]: s.value for s in _samples(live.get("/metrics").text,
                                                                  C.REPORTS_REJECTED_TOTAL.name)}
        assert rejected.get("stream_in_use") == 1.0 and "cardinality_cap" not in rejected
        closing = {"kind": "heartbeat", "job": "gan", "stream": "disc", "time": 2.0, "closing": True}
        live.post("/v1/reports", content=_batch(closing))
        assert live.post("/v1/reports", content=_batch(_attach("disc", "m2"))).status_code == 200  # a restart
