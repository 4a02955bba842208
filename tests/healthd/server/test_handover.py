"""A job silent on this shard is looked up through ``cluster.route_url`` (healthd.server.handover):
forgotten without paging when the shard behind the route heard from it later, kept (its stall pages)
when no shard has newer data or the route does not answer. Real servers on real sockets; the "route"
here is the owner itself (tests/integration/test_failback.py puts a real HAProxy in between)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from healthd.server.embedded import Embedded, free_port, serve_in_thread
from healthd.server.handover import Handover, JobMark, moved_elsewhere
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.wire.schema import JOB_HEADER
from tests.healthd.factories import step
from tests.integration.servers import wait_until

TOKEN = "handover-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(("answer", "moved"), [
    ({"last_seen": 100.0, "last_step": 7}, False),  # our own data, answered by this very shard
    ({"last_seen": 100.5, "last_step": 7}, True),  # heard from later elsewhere
    ({"last_seen": 90.0, "last_step": 9}, True),  # a later step (the owner's clock behind ours)
    ({"last_seen": 90.0, "last_step": 3}, False),  # an older copy: a shard that had the job before us
    ({"last_seen": 90.0, "last_step": None}, False),
    ({"last_seen": True, "last_step": True}, False),  # not numbers
    ({}, False),
])
def test_moved_elsewhere_only_on_newer_data(answer: dict[str, object], moved: bool) -> None:
    assert moved_elsewhere(JobMark(last_seen=100.0, last_step=7), answer) is moved


def _settings(route_url: str | None, stall_seconds: float = 600.0) -> Settings:
    return Settings.from_mapping({
        "auth": {"token": TOKEN},
        "engine": {"tick_seconds": 0.05},
        "alertmanager": {"silent_job_seconds": 0.3},
        "cluster": {"route_url": route_url, "route_recheck_seconds": 0.2, "route_timeout_seconds": 1.0},
        "rules": {"TrainingStalled": {"stall_seconds": stall_seconds},
                  "RankStalled": {"stall_seconds": stall_seconds}},
    })


def _post_steps(server: Embedded, job: str, steps: range) -> None:
    reports = [{"kind": "step", "job": job, "rank": 0, "time": time.time(), "step": i, "loss": 1.0} for i in steps]
    answer = httpx.post(server.url + "/v1/reports", content=json.dumps({"schema_version": 1, "reports": reports}),
                        headers={**AUTH, JOB_HEADER: job}, timeout=10)
    assert answer.status_code == 200, answer.text


def _metric(server: Embedded, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _firing(server: Embedded, job: str) -> list[str]:
    return [a.rule for a in server.hd.engine.alerts(job) if a.state.value == "firing"]


def test_a_job_that_moved_to_the_route_owner_is_forgotten_without_paging() -> None:
    with serve_in_thread(_settings(None)) as owner, serve_in_thread(_settings(owner.url)) as interim:
        _post_steps(interim, "moved", range(0, 5))  # the interim had the job while the owner was down
        _post_steps(owner, "moved", range(5, 10))  # failback: the owner has it again, and newer
        wait_until(lambda: "moved" not in interim.hd.store.jobs, timeout_seconds=20, interval_seconds=0.05,
                   what="the interim shard forgets the job that moved")
        assert _metric(interim, "healthd_jobs_handed_over_total") == 1
        assert 'job="moved"' not in httpx.get(interim.url + "/metrics", timeout=10).text  # no stale series
        assert interim.hd.engine.transitions_total["firing"] == 0
        assert "moved" in owner.hd.store.jobs and _metric(owner, "healthd_jobs_handed_over_total") == 0


def test_a_job_no_other_shard_has_newer_stays_and_its_stall_pages() -> None:
    """The route answers 404 (the owner never saw the job) for one job and is unreachable for the
    other's shard: both jobs are kept, and TrainingStalled fires for them."""
    with serve_in_thread(_settings(None)) as owner, \
            serve_in_thread(_settings(owner.url, stall_seconds=1.0)) as here, \
            serve_in_thread(_settings(f"http://127.0.0.1:{free_port()}", stall_seconds=1.0)) as cut_off:
        _post_steps(here, "stopped", range(0, 5))
        _post_steps(cut_off, "stopped", range(0, 5))
        for server in (here, cut_off):
            wait_until(lambda s=server: "TrainingStalled" in _firing(s, "stopped"), timeout_seconds=20,
                       interval_seconds=0.05, what="TrainingStalled for the job that really stopped")
            assert "stopped" in server.hd.store.jobs
            assert _metric(server, "healthd_jobs_handed_over_total") == 0


def _asked_through_mock(answer: dict[str, object], *, reports_meanwhile: bool) -> tuple[Healthd, list[str], int]:
    """One silent job, one look-up answered ``answer`` (httpx.MockTransport), then the next tick's poll;
    ``reports_meanwhile``: the job reports here again between the answer and that poll. Returns the
    instance, the jobs handed over (``on_handed_over``) and the requests made (three polls in all)."""
    now = [1000.0]
    hd = build(_settings("http://route.invalid"), clock=lambda: now[0])
    hd.store.apply(step(3, job="j", loss=1.0), now[0])
    requests: list[httpx.Request] = []

    def route(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=answer)

    handed: list[str] = []

    async def scenario() -> None:
        handover = Handover(hd, hd.settings.cluster, on_handed_over=handed.append,
                            client=httpx.AsyncClient(transport=httpx.MockTransport(route)))
        now[0] += 1.0  # silent past silent_job_seconds (0.3 s)
        handover.poll(["j"])
        handover.poll(["j"])  # asked already (in flight, then within route_recheck_seconds): not again
        await handover.answered()
        if reports_meanwhile:
            hd.store.apply(step(4, job="j", loss=1.0), now[0])
            now[0] += 1.0
        handover.poll(hd.store.silent(now[0], 0.3))
        await handover.close()

    asyncio.run(scenario())
    assert requests[0].headers[JOB_HEADER] == "j" and requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert requests[0].url.path == "/v1/jobs/j"
    return hd, handed, len(requests)


def test_a_moved_job_is_forgotten_at_the_next_poll_after_one_look_up() -> None:
    hd, handed, asked = _asked_through_mock({"last_seen": 1000.5, "last_step": 9}, reports_meanwhile=False)
    assert (handed, asked, hd.counters.handed_over, "j" in hd.store.jobs) == (["j"], 1, 1, False)


def test_a_job_that_reports_here_again_after_the_answer_is_kept() -> None:
    hd, handed, _ = _asked_through_mock({"last_seen": 1000.5, "last_step": 9}, reports_meanwhile=True)
    assert (handed, hd.counters.handed_over, "j" in hd.store.jobs) == ([], 0, True)


def test_our_own_data_back_from_the_route_keeps_the_job() -> None:
    hd, handed, asked = _asked_through_mock({"last_seen": 1000.0, "last_step": 3}, reports_meanwhile=False)
    assert (handed, asked, "j" in hd.store.jobs) == ([], 1, True)
