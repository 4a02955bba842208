"""Bearer-token auth and cardinality caps, against a real server (granian, as `healthd serve`)."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from healthd.exposition import catalog as C
from healthd.settings import Settings
from tests.live import live_healthd

TOKEN = "s3cret-token"


def _batch(*reports: dict) -> bytes:
    return json.dumps({"schema_version": 1, "reports": list(reports)}).encode()


def _step(i: int, job: str = "run-1", rank: int = 0, **kw) -> dict:
    return {"kind": "step", "job": job, "rank": rank, "time": 1.0, "step": i, **kw}


def _samples(text: str, name: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def test_token_is_required_for_ingest_and_api_but_not_metrics_by_default() -> None:
    settings = Settings.from_mapping({"auth": {"token": TOKEN}})
    with live_healthd(settings) as live:
        assert live.post("/v1/reports", content=_batch(_step(0))).status_code == 401
        wrong = live.post("/v1/reports", content=_batch(_step(0)), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
        assert "wrong bearer token" in wrong.json()["error"]
        assert live.get("/v1/alerts").status_code == 401
        ok = live.post("/v1/reports", content=_batch(_step(0)), headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["accepted"] == 1
        assert live.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).json()["jobs"][0]["job"] == "run-1"
        assert live.get("/healthz").status_code == 200
        metrics = live.get("/metrics")
        assert metrics.status_code == 200
        (refused,) = _samples(metrics.text, C.UNAUTHORIZED_REQUESTS_TOTAL.name)
        assert refused.value == 3


def test_metrics_and_healthz_can_be_protected() -> None:
    settings = Settings.from_mapping({"auth": {"token": TOKEN, "protect_metrics": True, "protect_healthz": True}})
    with live_healthd(settings) as live:
        assert live.get("/metrics").status_code == 401
        assert live.get("/healthz").status_code == 401
        assert live.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert live.get("/openapi.json").status_code == 200  # the API description is not a secret


def test_no_token_configured_means_open() -> None:
    with live_healthd() as live:
        assert live.post("/v1/reports", content=_batch(_step(0))).status_code == 200


def test_caps_name_the_cap_keep_the_rest_and_are_counted() -> None:
    settings = Settings.from_mapping({"limits": {"max_jobs": 2, "max_ranks_per_job": 2, "max_layers_per_job": 3}})
    with live_healthd(settings) as live:
        r = live.post("/v1/reports", content=_batch(
            _step(0, job="a", rank=0), _step(0, job="a", rank=1),
            _step(0, job="a", rank=2),  # third rank of job a: over max_ranks_per_job
            _step(0, job="b"), _step(0, job="c"),  # third job: over max_jobs
            _step(1, job="a", rank=0, loss=1.0)))
        assert r.status_code == 422
        body = r.json()
        assert body["accepted"] == 4
        by_index = {rej["index"]: rej["errors"][0] for rej in body["rejected"]}
        assert set(by_index) == {2, 4}
        assert by_index[2]["type"] == "cardinality_cap" and by_index[2]["loc"] == ["reports", 2, "rank"]
        assert "limits.max_ranks_per_job = 2" in by_index[2]["msg"]
        assert by_index[4]["loc"] == ["reports", 4, "job"] and "limits.max_jobs = 2" in by_index[4]["msg"]

        layers = {n: {"grad_norm": 1.0} for n in ("l0", "l1", "l2", "l3", "l4")}
        r = live.post("/v1/reports", content=_batch(_step(2, job="a", rank=0, loss=0.5, layers=layers)))
        assert r.status_code == 422 and r.json()["accepted"] == 1  # the step itself is kept
        (rej,) = r.json()["rejected"]
        assert rej["errors"][0]["loc"] == ["reports", 0, "layers", "l3"]
        assert "limits.max_layers_per_job = 3" in rej["errors"][0]["msg"]
        job = live.get("/v1/jobs/a").json()
        assert job["last_step"] == 2 and job["ranks"] == [0, 1]

        text = live.get("/metrics").text
        capped = {s.labels["cap"]: s.value for s in _samples(text, C.CARDINALITY_REJECTIONS_TOTAL.name)}
        assert capped == {"max_jobs": 1, "max_ranks_per_job": 1, "max_layers_per_job": 1}
        layer_series = {s.labels["layer"] for s in _samples(text, C.LAYER_GRAD_NORM.name)}
        assert layer_series == {"l0", "l1", "l2"}


def test_body_and_batch_limits_are_413_naming_the_limit() -> None:
    settings = Settings.from_mapping({"limits": {"max_body_bytes": 2048, "max_reports_per_request": 3}})
    with live_healthd(settings) as live:
        big = live.post("/v1/reports", content=_batch(*[_step(i, loss=1.0) for i in range(40)]))
        assert big.status_code == 413 and "limits.max_body_bytes" in big.json()["rejected"][0]["errors"][0]["msg"]
        many = live.post("/v1/reports", content=_batch(*[_step(i) for i in range(4)]))
        assert many.status_code == 413
        assert "limits.max_reports_per_request" in many.json()["rejected"][0]["errors"][0]["msg"]


def test_malformed_bodies_are_4xx_naming_the_field() -> None:
    with live_healthd() as live:
        cases = {
            b"not json": (400, []),
            b"[1, 2]": (422, []),
            b'{"reports": "x"}': (422, ["reports"]),
            b'{"schema_version": 2, "reports": []}': (422, ["schema_version"]),
            _batch(_step(0, job="bad job name!")): (422, ["reports", 0, "step", "job"]),
            _batch(_step(0, rank=-1)): (422, ["reports", 0, "step", "rank"]),
            _batch({"kind": "nope", "job": "j", "time": 1.0}): (422, ["reports", 0]),
            _batch(_step(0, job="JOB")).replace(b"JOB", b"j\xff"): (422, ["reports", 0]),  # not UTF-8
            # Nested past every parser's recursion limit, as a body and inside a report's field.
            b'{"reports": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}": (400, []),
            _batch(_step(0, layers="X")).replace(b'"X"', b'{"a": ' * 5_000 + b"1" + b"}" * 5_000): (400, []),
        }
        for body, (status, loc) in cases.items():
            r = httpx.post(live.url + "/v1/reports", content=body, timeout=10)
            assert r.status_code == status, body
            err = r.json()["rejected"][0]["errors"][0]
            assert err["loc"][: len(loc)] == loc, (body, err)


def test_free_text_that_becomes_a_label_has_a_character_rule() -> None:
    gpu = {"kind": "gpu", "job": "run-1", "rank": 0, "time": 1.0, "gpu": 0, "uuid": "GPU-5a4b-11"}
    bad = {
        ("uuid",): {**gpu, "uuid": 'GPU-1"} evil{x="'},
        ("hostname",): {**gpu, "hostname": "node 1\n"},
        ("mig_uuid",): {**gpu, "mig": True, "mig_uuid": "MIG 1"},
        ("throttle_reasons", 0): {**gpu, "throttle_reasons": ["Power Cap!"]},
        ("metrics", "val acc", "[key]"): {"kind": "eval", "job": "run-1", "rank": 0, "time": 1.0, "step": 3,
                                          "metrics": {"val acc": 0.5}},
    }
    with live_healthd() as live:
        for loc, report in bad.items():
            # The bad report sits between two good ones: 422 naming its field, the neighbours kept.
            r = httpx.post(live.url + "/v1/reports", content=_batch(_step(0), report, _step(1)), timeout=10)
            assert r.status_code == 422, loc
            body = r.json()
            assert body["accepted"] == 2, loc
            (rejection,) = body["rejected"]
            assert rejection["index"] == 1
            assert any(tuple(e["loc"][-len(loc):]) == loc for e in rejection["errors"]), (loc, rejection)
        ok = {**gpu, "uuid": "MIG-GPU-5a4b/1/0", "hostname": "gpu-node-7.cluster.local", "mig": True,
              "mig_uuid": "MIG-5a4b-22", "throttle_reasons": ["sw_power_cap"]}
        assert httpx.post(live.url + "/v1/reports", content=_batch(ok), timeout=10).status_code == 200
