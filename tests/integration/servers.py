"""Real Prometheus and Alertmanager for integration tests (Debian's binaries), on 127.0.0.1 and free ports.

Each server runs as a subprocess with its own temporary storage and stops when
its context manager exits. Prometheus scrapes and evaluates every second;
Alertmanager is started with ``--cluster.listen-address=`` so it never opens a
gossip port on other interfaces. A real healthd comes from ``tests.live``.

Use them through the fixtures in ``tests/integration/conftest.py``, or directly:

    with alertmanager() as am, live_healthd(...) as hd, \
         prometheus([hd.url], rule_files=[...], alertmanager_url=am.url) as prom:
        prom.wait_for("up == 1")
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import httpx
import yaml

from healthd.server.embedded import free_port

PROMETHEUS = "prometheus"
ALERTMANAGER = "prometheus-alertmanager"  # Debian's name for the alertmanager binary
T = TypeVar("T")


class ServerError(RuntimeError):
    """A server did not start, or a condition was not met in time; carries the server's log tail."""


def require_binary(name: str) -> str:
    """Path of a binary ``make test`` installs (``make system-deps``); a clear error when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise ServerError(f"{name} not found: run `make system-deps` (apt-get install prometheus "
                          f"prometheus-alertmanager)")
    return path


def wait_until(fn: Callable[[], T | None], *, timeout_seconds: float = 30.0, interval_seconds: float = 0.25,
               what: str = "condition", log: Callable[[], str] = lambda: "") -> T:
    """Poll ``fn`` until it returns something truthy; raise ``ServerError`` naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_seconds
    last_error: Exception | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last_error = e
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout_seconds}s waiting for {what}"
                              f"{f' (last error: {last_error!r})' if last_error else ''}\n{log()}")
        time.sleep(interval_seconds)


@dataclass
class _Process:
    proc: subprocess.Popen[bytes]
    workdir: Path
    url: str

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=10, **kw)


def _start(argv: list[str], workdir: Path, url: str, ready_path: str, timeout_seconds: float) -> _Process:
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    p = _Process(proc, workdir, url)

    def ready() -> bool:
        if proc.poll() is not None:
            raise ServerError(f"{argv[0]} exited with {proc.returncode}\n{p.log_tail()}")
        return httpx.get(url + ready_path, timeout=2).status_code == 200

    try:
        wait_until(ready, timeout_seconds=timeout_seconds, interval_seconds=0.1, what=f"{argv[0]} ready",
                   log=p.log_tail)
    except BaseException:
        _stop(p)
        raise
    return p


def _stop(p: _Process) -> None:
    if p.proc.poll() is None:
        p.proc.terminate()
        try:
            p.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait(timeout=10)


# ----------------------------------------------------------------------------- Prometheus


class Prometheus(_Process):
    """A running Prometheus: HTTP API helpers that raise on errors."""

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the ``result`` list (vector samples)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        r = self.get("/api/v1/query", params=params)
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"query {expr!r} failed: {body.get('error', r.text)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step_seconds: float = 1.0) -> list[dict[str, Any]]:
        r = self.get("/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                    "step": step_seconds})
        body = r.json()
        if body.get("status") != "success":
            raise ValueError(f"query_range {expr!r} failed: {body.get('error', r.text)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, expr: str, timeout_seconds: float = 30.0) -> list[dict[str, Any]]:
        """Wait until the instant query ``expr`` returns at least one sample; return them."""
        return wait_until(lambda: self.query(expr), timeout_seconds=timeout_seconds, what=f"PromQL {expr!r}",
                          log=self.log_tail)

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts Prometheus' rule manager holds (pending and firing)."""
        alerts: list[dict[str, Any]] = self.get("/api/v1/alerts").json()["data"]["alerts"]
        return alerts

    def rules(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.get("/api/v1/rules").json()["data"]["groups"]
        return groups


def prometheus_config(targets: Sequence[str], *, rule_files: Sequence[Path | str] = (),
                      alertmanager_url: str | None = None, interval_seconds: float = 1.0,
                      scrape_job: str = "healthd") -> dict[str, Any]:
    """A scrape config for healthd: ``honor_labels`` keeps the training job's own ``job`` label."""
    interval = f"{interval_seconds:g}s"
    cfg: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [{
            "job_name": scrape_job,
            "honor_labels": True,
            "static_configs": [{"targets": [_hostport(t) for t in targets]}],
        }],
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
    }
    if alertmanager_url:
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [_hostport(alertmanager_url)]}]}]}
    return cfg


def _hostport(url_or_target: str) -> str:
    if "//" not in url_or_target:
        return url_or_target
    u = urlparse(url_or_target)
    return f"{u.hostname}:{u.port}"


@contextmanager
def prometheus(targets: Sequence[str], *, rule_files: Sequence[Path | str] = (), alertmanager_url: str | None = None,
               interval_seconds: float = 1.0, start_timeout_seconds: float = 60.0) -> Iterator[Prometheus]:
    """Run Prometheus on 127.0.0.1 scraping ``targets`` (URLs or host:port) with temporary storage."""
    binary = require_binary(PROMETHEUS)
    with tempfile.TemporaryDirectory(prefix="healthd-prom-") as tmp:
        workdir = Path(tmp)
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(
            targets, rule_files=rule_files, alertmanager_url=alertmanager_url, interval_seconds=interval_seconds)))
        port = free_port()
        argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle", "--log.level=warn"]
        p = _start(argv, workdir, f"http://127.0.0.1:{port}", "/-/ready", start_timeout_seconds)
        prom = Prometheus(p.proc, p.workdir, p.url)
        try:
            yield prom
        finally:
            _stop(prom)


# ----------------------------------------------------------------------------- Alertmanager


class Alertmanager(_Process):
    """A running Alertmanager: v2 API helpers."""

    def alerts(self, *, active_only: bool = False, **labels: str) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts`` filtered by exact label values; ``active_only`` drops silenced/inhibited ones.

        Alertmanager lists an alert until its ``endsAt`` passes, so a resolved alert disappears.
        """
        params = [("filter", f'{k}="{v}"') for k, v in labels.items()]
        if active_only:
            params += [("silenced", "false"), ("inhibited", "false")]
        alerts: list[dict[str, Any]] = self.get("/api/v2/alerts", params=params).json()
        return alerts

    def cluster_peers(self) -> list[dict[str, Any]]:
        """The cluster members this node sees (``GET /api/v2/status``), itself included."""
        peers: list[dict[str, Any]] = self.get("/api/v2/status").json()["cluster"].get("peers") or []
        return peers

    def wait_for_alert(self, predicate: Callable[[dict[str, Any]], bool], timeout_seconds: float = 30.0,
                       what: str = "alert", **labels: str) -> dict[str, Any]:
        return wait_until(lambda: next((a for a in self.alerts(**labels) if predicate(a)), None),
                          timeout_seconds=timeout_seconds, what=what, log=self.log_tail)


DEFAULT_ALERTMANAGER_CONFIG: dict[str, Any] = {
    "route": {"receiver": "null", "group_by": ["alertname", "job"], "group_wait": "1s", "group_interval": "1s",
              "repeat_interval": "1h"},
    "receivers": [{"name": "null"}],
}


@contextmanager
def alertmanager(config: dict[str, Any] | Path | None = None, *, port: int | None = None,
                 start_timeout_seconds: float = 60.0,
                 cluster_args: Sequence[str] = ("--cluster.listen-address=",)) -> Iterator[Alertmanager]:
    """Run Alertmanager on 127.0.0.1 with temporary storage; no cluster listener unless ``cluster_args``
    says otherwise (``alertmanager_cluster``)."""
    binary = require_binary(ALERTMANAGER)
    with tempfile.TemporaryDirectory(prefix="healthd-am-") as tmp:
        workdir = Path(tmp)
        if isinstance(config, Path):
            cfg_path = config.resolve()
        else:
            cfg_path = workdir / "alertmanager.yml"
            cfg_path.write_text(yaml.safe_dump(config or DEFAULT_ALERTMANAGER_CONFIG))
        port = port or free_port()
        argv = [binary, f"--config.file={cfg_path}", f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}", *cluster_args, "--log.level=warn"]
        p = _start(argv, workdir, f"http://127.0.0.1:{port}", "/-/ready", start_timeout_seconds)
        am = Alertmanager(p.proc, p.workdir, p.url)
        try:
            yield am
        finally:
            _stop(am)


@contextmanager
def alertmanager_cluster(config: dict[str, Any], *, size: int = 2, peer_timeout_seconds: float = 2.0,
                         start_timeout_seconds: float = 60.0) -> Iterator[list[Alertmanager]]:
    """Run ``size`` Alertmanagers peered as one cluster (gossip on 127.0.0.1 only), until each sees all.

    The peers gossip their notification log: the first in the cluster's order notifies at once, the
    next waits ``peer_timeout_seconds`` per position and skips what a peer already sent. Short gossip
    intervals make the cluster form and converge in about a second."""
    cluster_ports = [free_port() for _ in range(size)]
    with ExitStack() as stack:
        nodes = []
        for i, port in enumerate(cluster_ports):
            args = [f"--cluster.listen-address=127.0.0.1:{port}",
                    *(f"--cluster.peer=127.0.0.1:{other}" for j, other in enumerate(cluster_ports) if j != i),
                    "--cluster.gossip-interval=50ms", "--cluster.pushpull-interval=1s",
                    f"--cluster.peer-timeout={peer_timeout_seconds:g}s", "--cluster.settle-timeout=5s"]
            nodes.append(stack.enter_context(alertmanager(config, start_timeout_seconds=start_timeout_seconds,
                                                          cluster_args=args)))
        for node in nodes:
            wait_until(lambda node=node: len(node.cluster_peers()) == size, timeout_seconds=start_timeout_seconds,
                       what=f"{node.url} to see {size} cluster peers", log=node.log_tail)
        yield nodes
