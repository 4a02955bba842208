"""healthd sharded by job behind a real HAProxy (deploy/haproxy/haproxy.cfg), in front of real
``healthd serve`` processes: each job's reports all land on one shard, adding or removing a shard
moves only the jobs that hash to it, bad input and a missing token are answered as by one healthd,
and a shard killed with SIGKILL hands its jobs to the others (docs/scaling.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from healthd.wire.schema import JOB_HEADER
from healthd_client import MonitorConfig
from healthd_client.transport import HttpTransport, Sender
from tests.healthd.server.test_gate import _every_route
from tests.integration.haproxy_process import SHARD_HEADER, HaproxyProcess, shard_config
from tests.integration.healthd_process import HealthdProcess
from tests.integration.servers import wait_until

pytestmark = pytest.mark.integration

TOKEN = "shard-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOBS = [f"job-{i}" for i in range(24)]
QUICK = dict(flush_interval_seconds=0.01, heartbeat_seconds=60.0, close_timeout_seconds=5.0,
             retry_backoff_min_seconds=0.05, retry_backoff_max_seconds=0.2)


def _report(job: str, step: int) -> dict:
    return {"kind": "eval", "job": job, "rank": 0, "time": time.time(), "step": step}


def _body(*reports: dict) -> bytes:
    return json.dumps({"schema_version": 1, "reports": list(reports)}).encode()


def _jobs_on(shard: HealthdProcess) -> set[str]:
    answer = httpx.get(shard.url + "/v1/jobs", headers=AUTH, timeout=10)
    answer.raise_for_status()
    return {j["job"] for j in answer.json()["jobs"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, HealthdProcess]]:
    """Four shards (ids 1-4); the deployed config routes to 1-3, the fourth is for adding one."""
    workdir = tmp_path_factory.mktemp("shards")
    made: dict[int, HealthdProcess] = {}
    try:
        for i in range(1, 5):
            (workdir / str(i)).mkdir()
            made[i] = HealthdProcess(workdir / str(i), env={"HEALTHD_TOKEN": TOKEN})
            made[i].start()
        yield made
    finally:
        for shard in made.values():
            shard.stop()


def _proxy(tmp_path: Path, shards: dict[int, HealthdProcess], ids: list[int], name: str) -> HaproxyProcess:
    proxy = HaproxyProcess(tmp_path, shard_config({i: f"127.0.0.1:{shards[i].port}" for i in ids}), name)
    try:
        proxy.wait_routing(len(ids))
    except BaseException:
        proxy.stop()
        raise
    return proxy


@pytest.fixture
def proxy(tmp_path: Path, shards: dict[int, HealthdProcess]) -> Iterator[HaproxyProcess]:
    proxy = _proxy(tmp_path, shards, [1, 2, 3], "three")
    yield proxy
    proxy.stop()


def _placement(proxy: HaproxyProcess) -> dict[str, str]:
    """job -> the shard (server name) the proxy routes it to, read from the answer's X-Healthd-Shard."""
    out = {}
    for job in JOBS:
        answer = httpx.post(proxy.url + "/v1/reports", content=_body(_report(job, 0)),
                            headers={**AUTH, JOB_HEADER: job}, timeout=10)
        assert answer.status_code == 200, answer.text
        out[job] = answer.headers[SHARD_HEADER]
    return out


def test_each_jobs_reports_all_land_on_one_shard(proxy: HaproxyProcess, shards: dict[int, HealthdProcess]) -> None:
    sender = Sender(HttpTransport(proxy.url, 10.0), MonitorConfig(**{**QUICK, "max_batch_reports": 8}), token=TOKEN)
    try:
        for step in range(10):  # interleaved, as many jobs' ranks would send
            for job in JOBS:
                sender.enqueue(_report(job, step))
        assert sender.flush(timeout=60)
    finally:
        sender.close(timeout=5)
    assert (sender.sent_total, sender.rejected_total) == (10 * len(JOBS), 0)
    held = {i: _jobs_on(shards[i]) & set(JOBS) for i in (1, 2, 3)}
    for job in JOBS:
        assert sum(job in jobs for jobs in held.values()) == 1, (job, held)
    assert set().union(*held.values()) == set(JOBS)
    assert sum(bool(jobs) for jobs in held.values()) == 3, held  # 24 jobs spread over all three
    assert not _jobs_on(shards[4]) & set(JOBS)  # not in the deployed ring


def test_adding_or_removing_a_shard_moves_only_the_jobs_that_hash_to_it(
        tmp_path: Path, proxy: HaproxyProcess, shards: dict[int, HealthdProcess]) -> None:
    before = _placement(proxy)
    assert before == _placement(proxy)  # stable
    added = _proxy(tmp_path, shards, [1, 2, 3, 4], "four")
    try:
        after_add = _placement(added)
    finally:
        added.stop()
    moved = {job for job in JOBS if after_add[job] != before[job]}
    assert moved and all(after_add[job] == "shard4" for job in moved), (before, after_add)
    removed = _proxy(tmp_path, shards, [1, 2], "two")
    try:
        after_remove = _placement(removed)
    finally:
        removed.stop()
    moved = {job for job in JOBS if after_remove[job] != before[job]}
    assert moved == {job for job in JOBS if before[job] == "shard3"}, (before, after_remove)


def test_reads_of_one_job_reach_the_shard_that_holds_it(proxy: HaproxyProcess) -> None:
    placement = _placement(proxy)
    for job in JOBS:
        for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/series", f"/v1/alerts?job={job}"):
            answer = httpx.get(proxy.url + path, headers=AUTH, timeout=10)
            assert answer.status_code == 200, (path, answer.text)
            assert answer.headers[SHARD_HEADER] == placement[job], path


def test_bad_input_through_the_proxy_gets_the_same_answer(proxy: HaproxyProcess,
                                                          shards: dict[int, HealthdProcess]) -> None:
    cases = [
        (b"{not json", {JOB_HEADER: "bad-1"}),
        (_body(_report("bad-2", 0)), {JOB_HEADER: "bad-1"}),  # header and body disagree
        (_body({"kind": "eval", "job": "bad-1", "rank": -1, "time": 1.0, "step": 0}), {JOB_HEADER: "bad-1"}),
        (b"x" * (2 << 20), {JOB_HEADER: "bad-1"}),  # large and not JSON: read whole through the proxy
    ]
    for body, headers in cases:
        through = httpx.post(proxy.url + "/v1/reports", content=body, headers={**AUTH, **headers}, timeout=10)
        direct = httpx.post(shards[1].url + "/v1/reports", content=body, headers={**AUTH, **headers}, timeout=10)
        assert 400 <= through.status_code < 500, through.text
        assert (through.status_code, through.content) == (direct.status_code, direct.content)
    mismatch = httpx.post(proxy.url + "/v1/reports", content=cases[1][0], headers={**AUTH, **cases[1][1]}, timeout=10)
    assert "'bad-2'" in mismatch.text and "'bad-1'" in mismatch.text


def test_the_token_still_guards_every_route_through_the_proxy(proxy: HaproxyProcess,
                                                              shards: dict[int, HealthdProcess]) -> None:
    from healthd.server.app import create_app

    open_paths = {"/openapi.json", "/metrics", "/healthz"}  # the default: see healthd.server.gate
    for method, path in _every_route(create_app()):
        without = httpx.request(method, proxy.url + path, headers={JOB_HEADER: "guarded"}, timeout=10)
        assert (without.status_code == 401) == (path not in open_paths), (method, path, without.status_code)
    assert not any("guarded" in _jobs_on(shards[i]) for i in (1, 2, 3))


def test_a_killed_shards_jobs_move_to_the_others(proxy: HaproxyProcess, shards: dict[int, HealthdProcess]) -> None:
    """Last in this module: it kills shard 2 for good."""
    before = _placement(proxy)
    victims = [job for job in JOBS if before[job] == "shard2"]
    assert victims
    sender = Sender(HttpTransport(proxy.url, 5.0), MonitorConfig(**QUICK), token=TOKEN)
    try:
        step = 1
        for job in victims:
            sender.enqueue(_report(job, step))
        assert sender.flush(timeout=30)
        shards[2].kill9()

        def monitored_elsewhere() -> bool:
            nonlocal step
            step += 1
            for job in victims:  # the training goes on: reports keep coming
                sender.enqueue(_report(job, step))
            sender.flush(timeout=2)
            held = _jobs_on(shards[1]) | _jobs_on(shards[3])
            return set(victims) <= held

        wait_until(monitored_elsewhere, timeout_seconds=60, interval_seconds=0.2,
                   what="the killed shard's jobs reaching the other shards", log=proxy.log)
    finally:
        sender.close(timeout=5)
    after = _placement(proxy)
    assert all(after[job] == before[job] for job in JOBS if job not in victims)  # the others stayed put
    assert {after[job] for job in victims} <= {"shard1", "shard3"}
