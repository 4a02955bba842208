"""Failback without a false page (``cluster.route_url``, healthd.server.handover): two real
``healthd serve`` shards behind a real HAProxy (deploy/haproxy/haproxy.cfg), each configured with the
proxy as its route. A job trains on its owner; the owner is killed with SIGKILL and the job moves to
the other shard (the interim); the owner restarts and HAProxy moves the job back. The interim, which
hears nothing more from the job, must forget it (it moved: the route's answer is newer) instead of
paging TrainingStalled, and stop exporting its series. The control: when the job really stops, the
owner asks the route too, gets its own data back, keeps the job and pages TrainingStalled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from healthd.exposition.catalog import ALERT_TRANSITIONS_TOTAL, JOBS_HANDED_OVER_TOTAL
from healthd.wire.schema import JOB_HEADER
from tests.integration.haproxy_process import SHARD_HEADER, HaproxyProcess, shard_config
from tests.integration.healthd_process import HealthdProcess
from tests.integration.servers import wait_until
from tests.integration.test_ha_alertmanager import Training  # one job's senders, the same loop

pytestmark = pytest.mark.integration

TOKEN = "failback-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SILENT_JOB_SECONDS = 2.0  # the interim looks the job up this long after it last heard from it
STALL_SECONDS = 8.0  # TrainingStalled/RankStalled: the interim's false page, without the look-up


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[HaproxyProcess, dict[str, HealthdProcess]]]:
    """Shards ``shard1`` and ``shard2`` (HAProxy's server names) and the proxy, which is their route."""
    shards = {f"shard{i}": HealthdProcess(tmp_path / str(i), env={"HEALTHD_TOKEN": TOKEN}) for i in (1, 2)}
    for i in (1, 2):
        (tmp_path / str(i)).mkdir()
    proxy = HaproxyProcess(tmp_path, shard_config({i: f"127.0.0.1:{shards[f'shard{i}'].port}" for i in (1, 2)}))
    try:
        (tmp_path / "healthd.yaml").write_text(json.dumps({  # JSON is YAML
            "engine": {"tick_seconds": 0.2},
            "alertmanager": {"silent_job_seconds": SILENT_JOB_SECONDS},
            "cluster": {"route_recheck_seconds": 1.0},  # route_url: --route-url below, as deploy/ sets it
            "rules": {"TrainingStalled": {"stall_seconds": STALL_SECONDS},
                      "RankStalled": {"stall_seconds": STALL_SECONDS}}}))
        for shard in shards.values():
            shard.extra_args = ("--config", str(tmp_path / "healthd.yaml"), "--route-url", proxy.url)
            shard.start()
        proxy.wait_routing(2)
        yield proxy, shards
    finally:
        proxy.stop()
        for shard in shards.values():
            shard.stop()


def _job_on(proxy: HaproxyProcess, owner: str) -> str:
    """A job name the proxy routes to ``owner`` (it hashes X-Healthd-Job on every request)."""
    for i in range(200):
        job = f"failback-{i}"
        if httpx.get(proxy.url + "/healthz", headers={JOB_HEADER: job}, timeout=5).headers[SHARD_HEADER] == owner:
            return job
    raise AssertionError(f"no job name routed to {owner}")


def _last_step(shard: HealthdProcess, job: str) -> int | None:
    """The job's last step on ``shard`` (None: the shard does not have the job, or is down)."""
    try:
        answer = httpx.get(f"{shard.url}/v1/jobs/{job}", headers=AUTH, timeout=5)
    except httpx.HTTPError:
        return None
    return answer.json()["last_step"] if answer.status_code == 200 else None


def _counter(shard: HealthdProcess, name: str, **labels: str) -> float:
    text = httpx.get(shard.url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _firing(shard: HealthdProcess, job: str) -> set[str]:
    answer = httpx.get(f"{shard.url}/v1/alerts", params={"job": job, "state": "firing"}, headers=AUTH, timeout=5)
    answer.raise_for_status()
    return {a["rule"] for a in answer.json()["alerts"]}


def test_failback_forgets_the_job_on_the_interim_shard_and_a_real_stall_still_pages(
        cluster: tuple[HaproxyProcess, dict[str, HealthdProcess]]) -> None:
    proxy, shards = cluster
    owner, interim = shards["shard1"], shards["shard2"]
    job = _job_on(proxy, "shard1")
    logs = lambda: proxy.log() + "\n".join(s.log() for s in shards.values())  # noqa: E731
    handed_over, transitions = JOBS_HANDED_OVER_TOTAL.name, ALERT_TRANSITIONS_TOTAL.name  # sample names

    with Training(proxy.url, (job,), TOKEN) as training:
        wait_until(lambda: (_last_step(owner, job) or 0) >= 5, timeout_seconds=30, what="the job on its owner",
                   log=logs)
        owner.kill9()
        wait_until(lambda: (_last_step(interim, job) or 0) >= 5, timeout_seconds=30,
                   what="the job moved to the interim shard", log=logs)
        owner.start()  # same port: HAProxy's health check (rise 2) puts it back, the job moves back
        wait_until(lambda: (_last_step(owner, job) or 0) >= 5, timeout_seconds=30,
                   what="the job back on its restarted owner", log=logs)
        back = time.monotonic()
        wait_until(lambda: _last_step(interim, job) is None and job not in httpx.get(
            interim.url + "/metrics", timeout=10).text, timeout_seconds=30,
                   what="the interim shard forgetting the job (and its series)", log=logs)
        print(f"interim forgot the job {time.monotonic() - back:.1f} s after it was back on its owner "
              f"(silent_job_seconds {SILENT_JOB_SECONDS}, stall_seconds {STALL_SECONDS})")
        assert _counter(interim, handed_over) == 1
        assert _counter(interim, transitions, state="firing") == 0  # it never paged
        assert (_last_step(owner, job) or 0) > 0 and not _firing(owner, job)

        # The control: the job really stops. Its owner asks the route, gets its own data back, keeps it.
        training.pause()
        stopped = time.monotonic()
        wait_until(lambda: "TrainingStalled" in _firing(owner, job), timeout_seconds=STALL_SECONDS + 30,
                   what="TrainingStalled for the job that really stopped", log=logs)
        print(f"TrainingStalled on the owner {time.monotonic() - stopped:.1f} s after the job stopped")
        assert _counter(owner, handed_over) == 0
        assert _last_step(interim, job) is None
