"""High availability end to end: 3 real ``healthd serve`` shards behind a real HAProxy
(deploy/haproxy/haproxy.cfg), each pushing to BOTH nodes of a real 2-node Alertmanager cluster,
whose webhook delivers to a receiver in this process that counts every notification.

The scenario: jobs keep training (a step every 0.1 s each, through the real client's sender and the
proxy); a fault in a job on one shard fires in Alertmanager; that shard is killed with SIGKILL and a
fault starts in another of its jobs after the kill (detected within 30 s of its onset, on the shard
that took the job over); the killed shard is restarted, HAProxy's health check puts it back and its
jobs move back. Throughout, no alert that was firing leaves either Alertmanager (the new owner
re-fires it with the same labels before the dead shard's endsAt lapses), and the receiver gets each
alert exactly once (the cluster's gossip deduplicates between the nodes) and never resolved (no
flapping). docs/scaling.md describes the model.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from healthd.server.embedded import free_port
from healthd.wire.schema import JOB_HEADER
from healthd_client import MonitorConfig
from healthd_client.transport import HttpTransport, Sender
from tests.integration.haproxy_process import SHARD_HEADER, HaproxyProcess, shard_config
from tests.integration.healthd_process import HealthdProcess
from tests.integration.servers import Alertmanager, alertmanager_cluster, wait_until

pytestmark = pytest.mark.integration

TOKEN = "ha-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOBS = [f"ha-job-{i}" for i in range(9)]
RESEND_SECONDS = 1.0  # endsAt of a firing alert = last push + 4 s: the failover must beat that
PEER_TIMEOUT_SECONDS = 2.0
GROUP_WAIT_SECONDS = 1.0
DETECTION_LIMIT_SECONDS = 30.0
QUICK = dict(flush_interval_seconds=0.01, heartbeat_seconds=60.0, close_timeout_seconds=5.0,
             retry_backoff_min_seconds=0.05, retry_backoff_max_seconds=0.2)


# ----------------------------------------------------------------------------- the webhook receiver

@dataclass
class Receiver:
    """Counts Alertmanager's webhook notifications per alert (by label set) and status."""

    deliveries: list[tuple[str, str, str]] = field(default_factory=list)  # (labels, status, sending node)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, payload: dict[str, Any]) -> None:
        with self.lock:
            for alert in payload["alerts"]:
                labels = json.dumps(alert["labels"], sort_keys=True)
                self.deliveries.append((labels, alert["status"], payload["externalURL"]))

    def firing(self, job: str) -> list[tuple[str, str, str]]:
        with self.lock:
            return [d for d in self.deliveries if json.loads(d[0])["job"] == job and d[1] == "firing"]

    def snapshot(self) -> list[tuple[str, str, str]]:
        with self.lock:
            return list(self.deliveries)


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    got = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.record(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield got, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- the cluster

@pytest.fixture
def cluster(receiver: tuple[Receiver, str]) -> Iterator[list[Alertmanager]]:
    config = {
        # One group per alert ('...'), so a notification is about one alert; repeat_interval far past the test.
        "route": {"receiver": "hook", "group_by": ["..."], "group_wait": f"{GROUP_WAIT_SECONDS:g}s",
                  "group_interval": "1s", "repeat_interval": "4h"},
        "receivers": [{"name": "hook", "webhook_configs": [{"url": receiver[1], "send_resolved": True}]}],
    }
    with alertmanager_cluster(config, size=2, peer_timeout_seconds=PEER_TIMEOUT_SECONDS) as nodes:
        yield nodes


@pytest.fixture
def shards(tmp_path: Path, cluster: list[Alertmanager]) -> Iterator[dict[int, HealthdProcess]]:
    (tmp_path / "healthd.yaml").write_text(json.dumps({"alertmanager": {
        "resend_seconds": RESEND_SECONDS, "max_backoff_seconds": 1.0}}))  # JSON is YAML
    peers = [arg for node in cluster for arg in ("--alertmanager-url", node.url)]
    made: dict[int, HealthdProcess] = {}
    try:
        for i in (1, 2, 3):
            (tmp_path / str(i)).mkdir()
            made[i] = HealthdProcess(tmp_path / str(i), env={"HEALTHD_TOKEN": TOKEN},
                                     extra_args=("--config", str(tmp_path / "healthd.yaml"), *peers))
            made[i].start()  # one after the other: on two busy cores, side by side is no faster
        yield made
    finally:
        for shard in made.values():
            shard.stop()


@pytest.fixture
def proxy(tmp_path: Path, shards: dict[int, HealthdProcess]) -> Iterator[HaproxyProcess]:
    proxy = HaproxyProcess(tmp_path, shard_config({i: f"127.0.0.1:{s.port}" for i, s in shards.items()}))
    try:
        proxy.wait_routing(3)
        yield proxy
    finally:
        proxy.stop()


# ----------------------------------------------------------------------------- the training jobs

class Training:
    """Every job sends a step every 0.1 s through its own client sender, as a training loop's rank 0
    would; a job in ``faulty`` reports a NaN loss from then on (NonFiniteValues)."""

    def __init__(self, url: str) -> None:
        self.senders = {job: Sender(HttpTransport(url, 5.0), MonitorConfig(**QUICK), token=TOKEN) for job in JOBS}
        self.faulty: set[str] = set()
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.steps += 1
            for job, sender in self.senders.items():
                loss = math.nan if job in self.faulty else 2.0 / (1 + 0.01 * self.steps)
                sender.enqueue({"kind": "step", "job": job, "rank": 0, "time": time.time(), "step": self.steps,
                                "loss": loss, "grad_norm": 1.0, "lr": [0.01]})
            self._stop.wait(0.1)

    def __enter__(self) -> Training:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sender in self.senders.values():
            sender.close(timeout=2)


def _placement(proxy: HaproxyProcess) -> dict[str, str]:
    """job -> the shard the proxy routes it to (X-Healthd-Shard of a report's answer)."""
    out = {}
    for job in JOBS:
        body = json.dumps({"schema_version": 1, "reports": [
            {"kind": "eval", "job": job, "rank": 0, "time": time.time(), "step": 0}]})
        answer = httpx.post(proxy.url + "/v1/reports", content=body, headers={**AUTH, JOB_HEADER: job}, timeout=10)
        assert answer.status_code == 200, answer.text
        out[job] = answer.headers[SHARD_HEADER]
    return out


def _jobs_on(shard: HealthdProcess) -> set[str]:
    answer = httpx.get(shard.url + "/v1/jobs", headers=AUTH, timeout=5)
    answer.raise_for_status()
    return {j["job"] for j in answer.json()["jobs"]}


class Watch:
    """Polls both Alertmanagers' active alerts; remembers every job whose alert, once active on a
    node, was later missing there (what must never happen)."""

    def __init__(self, nodes: list[Alertmanager]) -> None:
        self.nodes = nodes
        self.seen: dict[str, set[str]] = {n.url: set() for n in nodes}
        self.lost: list[tuple[str, str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def active(self, node: Alertmanager) -> set[str]:
        return {a["labels"]["job"] for a in node.alerts(alertname="NonFiniteValues")
                if a["status"]["state"] == "active"}

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in self.nodes:
                try:
                    now = self.active(node)
                except httpx.HTTPError:
                    continue
                self.lost += [(node.url, job, time.time()) for job in self.seen[node.url] - now]
                self.seen[node.url] |= now
            self._stop.wait(0.2)

    def on_every_node(self, job: str) -> bool:
        return all(job in self.active(node) for node in self.nodes)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- the scenario

def test_alerts_survive_a_shard_kill_and_restart_once_each_through_an_alertmanager_cluster(
        proxy: HaproxyProcess, shards: dict[int, HealthdProcess], cluster: list[Alertmanager],
        receiver: tuple[Receiver, str]) -> None:
    got, _ = receiver
    before = _placement(proxy)
    per_shard = {name: [job for job in JOBS if before[job] == name] for name in set(before.values())}
    victim_name = max(per_shard, key=lambda name: len(per_shard[name]))
    victim = shards[int(victim_name.removeprefix("shard"))]
    first, second = per_shard[victim_name][:2]  # two jobs of the shard that will be killed
    logs = lambda: proxy.log() + "\n".join(s.log() for s in shards.values())  # noqa: E731

    with Training(proxy.url) as training, Watch(cluster) as watch:
        training.faulty.add(first)
        wait_until(lambda: watch.on_every_node(first), timeout_seconds=DETECTION_LIMIT_SECONDS,
                   what=f"{first}'s NonFiniteValues active on both Alertmanagers", log=logs)
        wait_until(lambda: got.firing(first), timeout_seconds=30, what=f"{first}'s notification", log=logs)

        victim.kill9()
        onset = time.monotonic()
        training.faulty.add(second)  # the fault starts after its shard died
        wait_until(lambda: watch.on_every_node(second), timeout_seconds=DETECTION_LIMIT_SECONDS,
                   what=f"{second}'s alert after its shard's kill", log=logs)
        detected_after = time.monotonic() - onset
        survivors = [s for s in shards.values() if s is not victim]
        assert {first, second} <= set().union(*(_jobs_on(s) for s in survivors))  # taken over, not stale

        restart = time.monotonic()
        victim.start()  # same port and --db: HAProxy's health check (rise 2) puts it back in the ring
        wait_until(lambda: set(per_shard[victim_name]) <= _jobs_on(victim), timeout_seconds=30,
                   what="the restarted shard's jobs moving back to it", log=logs)
        failback = time.monotonic() - restart
        assert _placement(proxy) == before  # and the others never moved
        last_step = training.steps
        # Two more resend periods of the restarted shard with the jobs back on it, and past the
        # window in which the second node would notify what the first one had not (peer timeout).
        wait_until(lambda: training.steps >= last_step + 10 * (PEER_TIMEOUT_SECONDS + 4 * RESEND_SECONDS),
                   timeout_seconds=60, what="the jobs training on after the failback", log=logs)
        assert watch.on_every_node(first) and watch.on_every_node(second)

    assert not watch.lost, watch.lost  # no firing alert ever left an Alertmanager
    deliveries = got.snapshot()
    assert all(status == "firing" for _, status, _ in deliveries), deliveries  # nothing resolved: no flapping
    labels = [lab for lab, _, _ in deliveries]
    assert sorted(labels) == sorted(set(labels)), deliveries  # each alert notified once by the cluster
    assert {json.loads(lab)["job"] for lab in labels} == {first, second}
    assert detected_after < DETECTION_LIMIT_SECONDS
    print(f"\nfault after kill -9 visible on both Alertmanagers {detected_after:.1f} s after onset; "
          f"restart to jobs back on the shard {failback:.1f} s; "
          f"{len(deliveries)} notifications from {sorted({node for _, _, node in deliveries})}")
