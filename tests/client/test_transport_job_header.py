"""healthd_client.transport's ``X-Healthd-Job``: every body names its one job in a header, so that a
proxy can shard by job without reading the body (docs/scaling.md)."""

from __future__ import annotations

import json

import httpx

from healthd.server.embedded import serve_in_thread
from healthd_client import MonitorConfig
from healthd_client.transport import JOB_HEADER, HttpTransport, Sender
from tests.client.conftest import RecordingTransport

QUICK = dict(flush_interval_seconds=0.01, heartbeat_seconds=60.0, close_timeout_seconds=5.0,
             retry_backoff_min_seconds=0.005, retry_backoff_max_seconds=0.02)


def _report(job: str, step: int) -> dict:
    return {"kind": "eval", "job": job, "rank": 0, "time": 1.0, "step": step}


def test_the_client_names_the_header_the_server_reads() -> None:
    from healthd.wire.schema import JOB_HEADER as server_header

    assert JOB_HEADER == server_header


def test_every_body_holds_one_job_named_by_its_header() -> None:
    transport = RecordingTransport()
    sender = Sender(transport, MonitorConfig(**{**QUICK, "max_batch_reports": 4, "flush_interval_seconds": 30.0}))
    jobs = ["a", "a", "b", "a", "a", "a", "a", "a", "b", "b"]  # a caller that mixes jobs in one queue
    try:
        for step, job in enumerate(jobs):
            sender.enqueue(_report(job, step))
        assert sender.flush(timeout=10)
    finally:
        sender.close(timeout=1)
    sent = []
    for body, headers in zip(transport.bodies, transport.headers, strict=True):
        reports = json.loads(body)["reports"]
        assert {r["job"] for r in reports} == {headers[JOB_HEADER]}
        assert len(reports) <= 4
        sent += [(r["job"], r["step"]) for r in reports]
    assert sent == [(job, step) for step, job in enumerate(jobs)]  # nothing lost or reordered by the split
    assert sender.sent_total == len(jobs)


def test_a_job_name_a_header_cannot_carry_is_sent_without_it() -> None:
    transport = RecordingTransport()
    sender = Sender(transport, MonitorConfig(**QUICK))
    try:
        sender.enqueue(_report("jöb", 0))
        assert sender.flush(timeout=10)
    finally:
        sender.close(timeout=1)
    assert JOB_HEADER not in transport.headers[0]


def test_a_real_server_accepts_what_the_client_sends_for_two_jobs() -> None:
    with serve_in_thread() as served:
        sender = Sender(HttpTransport(served.url, 10.0), MonitorConfig(**QUICK))
        try:
            for step in range(6):
                sender.enqueue(_report("real-a" if step % 2 else "real-b", step))
            assert sender.flush(timeout=20)
        finally:
            sender.close(timeout=5)
        assert (sender.sent_total, sender.rejected_total) == (6, 0)
        jobs = {j["job"] for j in httpx.get(f"{served.url}/v1/jobs", timeout=10).json()["jobs"]}
    assert {"real-a", "real-b"} <= jobs
