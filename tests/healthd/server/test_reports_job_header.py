"""healthd.server.reports with ``X-Healthd-Job``: the job a proxy routed the batch by must be every
report's job, at both doors (RSGI as ``healthd serve`` runs it, and ASGI); no header is an older
client, accepted as before."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from healthd.server.app import create_app
from healthd.server.embedded import Embedded, serve_in_thread
from healthd.wire.schema import JOB_HEADER


def _batch(*jobs: str) -> bytes:
    return json.dumps({"schema_version": 1, "reports": [
        {"kind": "step", "job": job, "rank": 0, "time": 1.0, "step": i, "loss": 1.0}
        for i, job in enumerate(jobs)]}).encode()


@pytest.fixture(scope="module")
def served() -> Iterator[Embedded]:
    with serve_in_thread() as e:
        yield e


def _post_rsgi(served: Embedded, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{served.url}/v1/reports", content=body, headers=headers, timeout=10)


def _jobs(served: Embedded) -> set[str]:
    return {j["job"] for j in httpx.get(f"{served.url}/v1/jobs", timeout=10).json()["jobs"]}


def test_a_matching_header_is_accepted(served: Embedded) -> None:
    answer = _post_rsgi(served, _batch("hdr-a", "hdr-a"), {JOB_HEADER: "hdr-a"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 2
    assert "hdr-a" in _jobs(served)


def test_no_header_is_an_older_client_and_accepted(served: Embedded) -> None:
    answer = _post_rsgi(served, _batch("hdr-old", "hdr-old-2"), {})
    assert answer.status_code == 200, answer.text
    assert {"hdr-old", "hdr-old-2"} <= _jobs(served)


@pytest.mark.parametrize("jobs", [("hdr-b",), ("hdr-c", "hdr-b")])
def test_a_report_of_another_job_refuses_the_whole_batch_naming_both(served: Embedded,
                                                                     jobs: tuple[str, ...]) -> None:
    answer = _post_rsgi(served, _batch(*jobs), {JOB_HEADER: "hdr-c"})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["accepted"] == 0
    [rejection] = body["rejected"]
    [error] = rejection["errors"]
    assert error["type"] == "job_mismatch"
    assert rejection["index"] == jobs.index("hdr-b")
    assert error["loc"] == ["reports", rejection["index"], "job"]
    assert "'hdr-b'" in error["msg"] and "'hdr-c'" in error["msg"] and JOB_HEADER in error["msg"]
    assert not {"hdr-b", "hdr-c"} & _jobs(served)  # nothing was applied, not even the matching report
    metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
    assert 'healthd_reports_rejected_total{reason="job_mismatch"}' in metrics


def test_the_asgi_door_checks_the_header_too() -> None:
    app = create_app()

    async def post() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            return (await client.post("/v1/reports", content=_batch("asgi-b"), headers={JOB_HEADER: "asgi-a"}),
                    await client.post("/v1/reports", content=_batch("asgi-a"), headers={JOB_HEADER: "asgi-a"}),
                    await client.post("/v1/reports", content=_batch("asgi-c")))

    refused, accepted, old = asyncio.run(post())
    assert refused.status_code == 400 and refused.json()["rejected"][0]["errors"][0]["type"] == "job_mismatch"
    assert accepted.status_code == 200 and old.status_code == 200
    assert set(app.state.healthd.store.jobs) == {"asgi-a", "asgi-c"}
