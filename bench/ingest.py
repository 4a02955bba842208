"""Ingest throughput of one healthd server core, with the rules engine on, against a bare-endpoint ceiling.

Usage::

    .venv/bin/python bench/ingest.py                      # 2,048 ranks, 10 reports/request, 30 s per target
    .venv/bin/python bench/ingest.py --soak-seconds 600   # 10-minute soak: RSS and open files over time

Each target runs in its own process pinned to CPU 0 (``sched_setaffinity``), the load
generator on the other CPUs: a raw asyncio HTTP/1.1 keep-alive client (so the generator,
not httpx, is cheap) with ``--connections`` connections. Bodies are ``ReportBatch``es of
``--reports-per-request`` step reports, each for one of ``--ranks`` simulated ranks of one
job, steps counting up per rank (realistic values: loss, grad norm, lr, update ratio, 4
layers). Targets:

- ``healthd``: the real app (``create_app``), all rules in ``ALL_RULES``, served as ``healthd serve``
  serves it (``healthd.server.serving.serve``: granian, RSGI, uvloop);
- ``bare``: a Starlette route that only reads the body and answers 200, under uvicorn (httptools,
  uvloop): the ceiling of an ASGI server;
- ``bare-rsgi``: the same as an RSGI app under granian: the ceiling of the path healthd's reports take;
- ``validate`` (on request): healthd's endpoint with ingest cut down to pydantic's ``validate_json`` of
  the batch, no store, no rules: the issue's "Starlette + validate_json" reference point;
- ``parse`` (on request): the same with healthd's own ``parse_batch`` (msgspec, ``healthd.wire.records``):
  the ceiling parsing leaves.

``--shards 1,2,3`` instead runs N real ``healthd serve`` processes behind a real HAProxy (deploy/haproxy/
haproxy.cfg's frontend, ``balance hdr(X-Healthd-Job)``, consistent hash and checks, its server lines
generated for N shards in a temp dir), the ranks split over ``--jobs`` jobs (64) so the hash spreads them,
every request naming its job in X-Healthd-Job. Printed per N: reports/s, p50/p99, no failed request, the
reports and jobs each shard got, the CPU the proxy and the shards used (``/proc/<pid>/stat``) and the
proxy's CPU per request; with N=1 also ``direct-1``, the same load straight to the same shard. Nothing is
pinned there: proxy, shards and generator share the machine's CPUs, and the output says so.

A ``-asgi`` suffix serves a healthd target through its ASGI door under plain uvicorn (httptools,
uvloop, no custom protocol) instead: ``healthd-asgi`` against ``healthd`` is what the server costs.

Printed per target: reports/s, request latency p50/p99, the server's peak RSS (VmHWM), the share of
the server core's time the hypervisor gave to other tenants meanwhile (``server_cpu_steal_pct``, from
/proc/stat: on a shared VM the same code moves by tens of percent with it); for healthd
also, from ``/healthz`` polled every second, how long steps waited for rank rules (median and max),
how many ranks waited, and rank evaluations per second (engine.rank_rules_cpu_share bounds their CPU);
and the duration and size of a ``/metrics`` scrape taken every ``--scrape-seconds`` (15) during the
run, as Prometheus would (its cost is part of the load).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from healthd.rules import ALL_RULES  # noqa: E402
from healthd.wire.schema import JOB_HEADER  # noqa: E402

SHARD_HEADER = b"x-healthd-shard"  # deploy/haproxy/haproxy.cfg names the shard that answered in it
HAPROXY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"

LAYERS = ("embed", "block.0", "block.1", "head")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(target: str, port: int, ready: mp.Event, share: float,  # type: ignore[valid-type]
           ranks: int, prefill: int) -> None:
    os.sched_setaffinity(0, {0})
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    target, _, server_kind = target.partition("-")  # healthd-asgi: the healthd app under plain uvicorn
    if target == "bare":
        if server_kind == "rsgi":
            _serve_bare_rsgi(port, ready)
            return

        async def read_only(request: Request) -> Response:
            await request.body()
            return Response(b'{"accepted":0,"rejected":[]}', media_type="application/json")

        app: Any = Starlette(routes=[Route("/v1/reports", read_only, methods=["POST"])])
        server_kind = "asgi"
    else:
        from healthd.server.app import create_app
        from healthd.server.gc_policy import ServingGC
        from healthd.settings import Settings

        app = create_app(Settings.from_mapping({"limits": {"max_ranks_per_job": 100_000},
                                                "engine": {"rank_rules_cpu_share": share}}),
                         gc_policy=ServingGC())  # as `healthd serve`
        if target in ("validate", "parse"):  # the endpoint and parsing only: what the store and rules add is the rest
            from pydantic import TypeAdapter

            from healthd.wire.parse import parse_batch
            from healthd.wire.records import NameCheck
            from healthd.wire.schema import IngestResult, ReportBatch

            batch, names = TypeAdapter(ReportBatch), NameCheck()

            def validate_only(body: bytes, routed_job: str | None = None) -> tuple[int, IngestResult]:
                if target == "validate":  # the reference point: pydantic validate_json of the batch
                    return 200, IngestResult(accepted=len(batch.validate_json(body).reports))
                return 200, IngestResult(accepted=len(parse_batch(body, 1_000, names).reports))

            app.state.healthd.ingest = validate_only
        elif prefill:
            # Full windows, as in a long run: rules' cost grows with what they look at.
            from healthd.wire.parse import parse_batch
            hd = app.state.healthd
            rng = random.Random(1)
            now = time.time()
            for rank in range(ranks):
                for report in parse_batch(_body(range(rank, rank + 1), 0, prefill, rng), prefill, hd.names).reports:
                    hd.store.apply(report, now)
    import uvloop

    if server_kind != "asgi":  # as `healthd serve`: granian, RSGI, on uvloop
        from healthd.server.serving import Listen, serve

        uvloop.run(serve(app, Listen(host="127.0.0.1", port=port, log_level="warning"), asyncio.Event(),
                         started=ready.set))
        return
    # uvicorn with its own httptools protocol and uvloop: a plain ASGI server, no custom protocol.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            lifespan="on", loop="uvloop", http="httptools")
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        ready.set()  # type: ignore[attr-defined]
        await task

    uvloop.run(main())


def _serve_bare_rsgi(port: int, ready: Any) -> None:
    """An RSGI app that reads the body and answers 200, under granian: healthd's serving path, no ingest."""
    import uvloop
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    headers = [("content-type", "application/json")]

    class ReadOnly:
        async def __rsgi__(self, scope: Any, proto: Any) -> None:
            async for _ in proto:
                pass
            proto.response_bytes(200, headers, b'{"accepted":0,"rejected":[]}')

    async def main() -> None:
        server = Server(ReadOnly(), address="127.0.0.1", port=port, interface=Interfaces.RSGI,
                        http=HTTPModes.http1, websockets=False, log_level=LogLevels.warning)
        server.on_startup(ready.set)
        await server.serve()

    uvloop.run(main())


def _body(ranks: range, step: int, per_request: int, rng: random.Random, job: str = "bench") -> bytes:
    """``per_request`` step reports of ``ranks`` round-robin from ``step`` on: one rank and
    ``per_request`` consecutive steps is what a healthd_client sends (a rank's queue per flush)."""
    reports = []
    for k in range(per_request):
        rank = ranks[k % len(ranks)]
        s = step + k // len(ranks)
        loss = 2.5 * (1 + s) ** -0.3 + rng.random() * 0.01
        reports.append({"kind": "step", "job": job, "rank": rank, "time": time.time(), "step": s,
                        "loss": loss, "batch_size": 32, "step_seconds": 0.1, "lr": [3e-4],
                        "grad_norm": 1.0 + rng.random() * 0.1, "update_ratio": 1e-3 * (1 + rng.random() * 0.1),
                        "layers": {name: {"grad_norm": 0.5 + rng.random() * 0.01,
                                          "update_ratio": 1e-3 * (1 + rng.random() * 0.1)} for name in LAYERS}})
    return json.dumps({"schema_version": 1, "reports": reports}).encode()


async def _connection(port: int, bodies: list[tuple[str, bytes]], stop_at: float, latencies: list[float],
                      counts: list[int], per_request: int, by_shard: dict[str, int]) -> None:
    """POST ``bodies`` (job, body) in turn over one keep-alive connection until ``stop_at``; each request
    names its job in X-Healthd-Job as healthd_client does (the proxy hashes it). ``by_shard`` counts
    reports per X-Healthd-Shard the proxy answered with (empty without a proxy)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    while time.perf_counter() < stop_at:
        job, body = bodies[i % len(bodies)]
        i += 1
        head = (f"POST /v1/reports HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"{JOB_HEADER}: {job}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        writer.write(head + body)
        status_line = await reader.readline()
        length = 0
        shard = ""
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            elif name.lower() == SHARD_HEADER:
                shard = value.strip().decode()
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - t0)
        if status_line.split()[1] in (b"200", b"422"):
            counts[0] += per_request
            if shard:
                by_shard[shard] = by_shard.get(shard, 0) + per_request
        else:
            counts[1] += 1
    writer.close()


async def _get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    text = (await reader.read()).decode()
    writer.close()
    return text.partition("\r\n\r\n")[2]


async def _sample(port: int, stop_at: float, samples: list[dict[str, float]], scrape_seconds: float) -> None:
    """Every second ``/healthz`` (the evaluation queue's wait, rule evaluations so far); every
    ``scrape_seconds`` a Prometheus-like scrape of ``/metrics``, timed (it is part of the load)."""
    next_scrape = time.perf_counter() + scrape_seconds
    while time.perf_counter() + 1.0 < stop_at:
        await asyncio.sleep(1.0)
        sample = json.loads(await _get(port, "/healthz"))
        sample["t"] = time.perf_counter()
        if scrape_seconds and sample["t"] >= next_scrape:
            next_scrape += scrape_seconds
            t0 = time.perf_counter()
            text = await _get(port, "/metrics")
            sample["scrape_bytes"] = len(text)
            sample["scrape_series"] = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            sample["scrape_seconds"] = time.perf_counter() - t0
        samples.append(sample)


def _jobs(args: argparse.Namespace) -> list[tuple[str, range]]:
    """(job, its ranks): ``--ranks`` split over ``--jobs`` jobs (one job ``bench`` by default)."""
    jobs = max(1, getattr(args, "jobs", 1))
    if jobs == 1:
        return [("bench", range(args.ranks))]
    size = -(-args.ranks // jobs)
    return [(f"bench-{j}", range(min(size, args.ranks - j * size))) for j in range(jobs) if j * size < args.ranks]


def _load(port: int, args: argparse.Namespace, seconds: float, step0: int,
          samples: list[dict[str, float]] | None = None,
          by_shard: dict[str, int] | None = None) -> tuple[float, list[float], int]:
    """Drive the server for ``seconds``; returns (reports/s, latencies, failed requests)."""
    rng = random.Random(0)
    per = args.reports_per_request
    width = args.ranks_per_request
    groups = [(job, range(r, min(r + width, len(ranks))))
              for job, ranks in _jobs(args) for r in range(0, len(ranks), width)]
    # Each body carries `width` ranks of one job (default 1, like healthd_client) for `per // width`
    # consecutive steps each; bodies cycle through the ranks (of every job), then the steps advance.
    advance = max(1, per // width)
    bodies = [(job, _body(g, step0 + s * advance, per, rng, job))
              for s in range(args.steps_per_cycle) for job, g in groups]
    latencies: list[float] = []
    counts = [0, 0]
    shards: dict[str, int] = {} if by_shard is None else by_shard

    async def run() -> float:
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        per_conn = [bodies[c::args.connections] for c in range(args.connections)]
        sampler = [_sample(port, stop_at, samples, args.scrape_seconds)] if samples is not None else []
        await asyncio.gather(*(_connection(port, b, stop_at, latencies, counts, per, shards) for b in per_conn),
                             *sampler)
        return time.perf_counter() - t0

    elapsed = asyncio.run(run())
    return counts[0] / elapsed, latencies, counts[1]


def _proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM", "VmRSS")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def _cpu_times(cpu: int = 0) -> tuple[int, int]:
    """(steal, total) jiffies of one CPU from /proc/stat: on a shared VM the hypervisor takes time from
    the server's core for other tenants (steal), which no code change moves; reported next to each result."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                fields = [int(x) for x in line.split()[1:]]
                return fields[7], sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return 0, 0


def _steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else float("nan")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _wait_listening(target: str, port: int, proc: Any, seconds: float = 60.0) -> None:
    """Wait until the server accepts connections. A start-up hook may run before the listener is bound
    (granian's embedded server once refused the first connection after its ``on_startup``: a CI failure)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if not proc.is_alive():
                raise RuntimeError(f"{target} server exited with code {proc.exitcode} before it listened") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} server did not listen on {port} in {seconds:.0f} s") from None
            time.sleep(0.05)


def bench(target: str, args: argparse.Namespace) -> dict[str, float]:
    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_serve, args=(target, port, ready, args.rank_rules_cpu_share,
                                                        args.ranks, args.prefill_steps), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 600
        while not ready.wait(0.2):  # a server that dies at start (a missing module) fails here, not in 600 s
            if not proc.is_alive():
                raise RuntimeError(f"{target} server exited with code {proc.exitcode} before it started")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} server did not start in 600 s")
        _wait_listening(target, port, proc)
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)) or {0})
        _load(port, args, args.warmup_seconds, args.prefill_steps)  # warm the server up (windows were filled at start)
        if args.soak_seconds:
            return _soak(proc.pid or 0, port, args)
        samples: list[dict[str, float]] | None = [] if target == "healthd" else None
        cpu0 = _cpu_times()
        rate, lat, failed = _load(port, args, args.seconds, 10_000, samples)
        steal = _steal_pct(cpu0, _cpu_times())
        st = _proc_status(proc.pid or 0)
        out = {"reports_per_second": rate, "p50_ms": statistics.median(lat) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3,
               "peak_rss_mib": st["VmHWM"] / 2**20, "failed_requests": failed, "requests": len(lat),
               "server_cpu_steal_pct": steal}
        if samples and len(samples) > 1:  # how long steps waited for rank rules; how often ranks were evaluated
            delays = [x["rank_evaluation_delay_seconds"] for x in samples]
            out["eval_delay_median_s"] = statistics.median(delays)
            out["eval_delay_max_s"] = max(delays)
            out["ranks_pending_median"] = statistics.median(x["rank_evaluations_pending"] for x in samples)
            first, last = samples[0], samples[-1]
            out["rank_evaluations_per_s"] = ((last["rule_evaluations_total"] - first["rule_evaluations_total"])
                                             / (last["t"] - first["t"]))
            scrapes = [x["scrape_seconds"] for x in samples if "scrape_seconds" in x]
            if scrapes:
                out["scrape_ms_max"] = max(scrapes) * 1e3
                out["scrape_mib"] = max(x["scrape_bytes"] for x in samples if "scrape_bytes" in x) / 2**20
                out["scrape_series"] = max(x["scrape_series"] for x in samples if "scrape_series" in x)
        return out
    finally:
        proc.terminate()
        proc.join(10)


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of one process so far, from /proc/<pid>/stat (fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _haproxy_config(ports: list[int]) -> str:
    """deploy/haproxy/haproxy.cfg (the same frontend, balance, hash, checks) with its server lines
    replaced by one per shard port, ids 1..N as an operator would number them."""
    text = HAPROXY_CONFIG.read_text()
    servers = "".join(f'    server shard{i} "127.0.0.1:{port}" id {i}\n' for i, port in enumerate(ports, 1))
    replaced, n = re.subn(r"(    server shard\d+ .*\n)+", servers, text)
    if n != 1:
        raise RuntimeError(f"{HAPROXY_CONFIG}: expected one block of shard server lines")
    return replaced


def _http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


def _wait(what: str, ok: Any, procs: list[subprocess.Popen[bytes]], logs: list[Path], seconds: float = 120) -> None:
    """Poll ``ok()`` until true; fail at once with the log of a process that exited."""
    deadline = time.monotonic() + seconds
    while True:
        for proc, log in zip(procs, logs, strict=False):  # procs grow as they start
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if ok():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready in {seconds} s")
        time.sleep(0.1)


def bench_shards(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    """``n`` real ``healthd serve`` processes behind a real HAProxy running deploy/haproxy/haproxy.cfg's
    settings; the load spread over ``--jobs`` jobs so the hash spreads it. Nothing is pinned: the proxy,
    the shards and this load generator share the machine's CPUs. Returns ``shards-N``, and for ``n == 1``
    also ``direct-1``: the same load straight to the same shard, so the difference is the proxy's cost."""
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    config = workdir / "healthd.yaml"
    config.write_text(json.dumps({"limits": {"max_ranks_per_job": 100_000},
                                  "engine": {"rank_rules_cpu_share": args.rank_rules_cpu_share}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HAPROXY_CONFIG.parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("HEALTHD_TOKEN", None)
    ports = [_free_port() for _ in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    logs = [workdir / f"shard{i}.log" for i in range(1, n + 1)] + [workdir / "haproxy.log"]
    try:
        for port, log in zip(ports, logs, strict=False):  # the last log is the proxy's
            with open(log, "wb") as log_file:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "healthd.tools.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                     "--config", str(config), "--log-level", "warning"], stdout=log_file, stderr=subprocess.STDOUT,
                    env=env))
        for port in ports:
            _wait("healthd serve", lambda port=port: _http_get(port, "/healthz")[0] == 200, procs, logs)
        proxy_port = _free_port()
        (workdir / "haproxy.cfg").write_text(_haproxy_config(ports))
        with open(logs[-1], "wb") as log_file:
            procs.append(subprocess.Popen([_haproxy_binary(), "-db", "-f", str(workdir / "haproxy.cfg")],
                                          stdout=log_file, stderr=subprocess.STDOUT,
                                          env={**os.environ, "HEALTHD_PROXY_BIND": f"127.0.0.1:{proxy_port}"}))
        seen: set[str] = set()

        def routed() -> bool:  # every shard passed the proxy's health checks
            status, headers, _ = _http_get(proxy_port, "/healthz")
            if status == 200 and "x-healthd-shard" in headers:
                seen.add(headers["x-healthd-shard"])
            return len(seen) == n
        _wait("haproxy routing to every shard", routed, procs, logs)
        shard_pids, proxy_pid = [p.pid for p in procs[:n]], procs[-1].pid
        _load(proxy_port, args, args.warmup_seconds, 0)
        out: dict[str, dict[str, float]] = {}
        targets = [(f"shards-{n}", proxy_port)] + ([("direct-1", ports[0])] if n == 1 else [])
        for step0, (name, port) in enumerate(targets, 1):
            load0, proxy0 = os.getloadavg()[0], _cpu_seconds(proxy_pid)
            shards0, gen0 = sum(_cpu_seconds(p) for p in shard_pids), time.process_time()
            by_shard: dict[str, int] = {}
            rate, lat, failed = _load(port, args, args.seconds, step0 * 100_000, by_shard=by_shard)
            row = {"reports_per_second": rate, "p50_ms": statistics.median(lat) * 1e3,
                   "p99_ms": _pct(lat, 0.99) * 1e3, "failed_requests": failed, "requests": len(lat),
                   "shards_cpu_s": sum(_cpu_seconds(p) for p in shard_pids) - shards0,
                   "proxy_cpu_s": _cpu_seconds(proxy_pid) - proxy0,
                   "loadgen_cpu_s": time.process_time() - gen0, "loadavg_1m": load0,
                   "shards_rss_mib": sum(_proc_status(p)["VmRSS"] for p in shard_pids) / 2**20}
            row["proxy_cpu_us_per_request"] = 1e6 * row["proxy_cpu_s"] / max(1, len(lat))
            row["shards_cpu_us_per_report"] = 1e6 * row["shards_cpu_s"] / max(1.0, rate * args.seconds)
            for i, port_i in enumerate(ports, 1):  # what each shard holds, asked of the shard itself
                row[f"jobs_shard{i}"] = len(json.loads(_http_get(port_i, "/v1/jobs")[2])["jobs"])
                row[f"reports_shard{i}"] = by_shard.get(f"shard{i}", 0)
            out[name] = row
        return out
    finally:
        for proc in reversed(procs):  # SIGTERM: a shard settles its backlog and saves alert state first
            if proc.poll() is None:
                proc.terminate()
                t0 = time.monotonic()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                print(f"  pid {proc.pid} stopped {time.monotonic() - t0:.1f} s after SIGTERM", file=sys.stderr)


def _haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                              if os.path.exists(p)), None)
    if not found:
        raise RuntimeError("--shards needs HAProxy (>= 2.6) on PATH or in /usr/sbin")
    return found


def _soak(pid: int, port: int, args: argparse.Namespace) -> dict[str, float]:
    samples = []
    t_end = time.monotonic() + args.soak_seconds
    step0 = 10_000
    while time.monotonic() < t_end:
        cpu0 = _cpu_times()
        rate, lat, failed = _load(port, args, min(30.0, t_end - time.monotonic()), step0)
        steal = _steal_pct(cpu0, _cpu_times())
        step0 += args.steps_per_cycle * 1000
        st = _proc_status(pid)
        samples.append(st)
        print(f"  soak t={args.soak_seconds - (t_end - time.monotonic()):6.0f}s  {rate:8.0f} reports/s  "
              f"p99 {_pct(lat, 0.99) * 1e3:6.1f} ms  RSS {st['VmRSS'] / 2**20:7.1f} MiB  fds {st['fds']}  "
              f"steal {steal:4.1f}%", flush=True)
    return {"rss_first_mib": samples[0]["VmRSS"] / 2**20, "rss_last_mib": samples[-1]["VmRSS"] / 2**20,
            "fds_first": samples[0]["fds"], "fds_last": samples[-1]["fds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2048)
    p.add_argument("--reports-per-request", type=int, default=10)
    p.add_argument("--ranks-per-request", type=int, default=1,
                   help="ranks in one request: 1 is healthd_client (one rank's queue per POST); "
                        "10 with 10 reports per request is the old shape, one step of 10 ranks (a proxy)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--scrape-seconds", type=float, default=15.0,
                   help="scrape /metrics this often during the run, as Prometheus would (0: never)")
    p.add_argument("--warmup-seconds", type=float, default=10.0)
    p.add_argument("--prefill-steps", type=int, default=512,
                   help="steps put in every rank's window before the run (store.window_steps: full windows)")
    p.add_argument("--steps-per-cycle", type=int, default=3, help="distinct steps per rank in the body pool")
    p.add_argument("--soak-seconds", type=float, default=0.0, help="soak the healthd target instead")
    p.add_argument("--targets", default="bare,bare-rsgi,healthd")
    p.add_argument("--rank-rules-cpu-share", type=float, default=0.25, help="engine.rank_rules_cpu_share")
    p.add_argument("--shards", default="",
                   help="comma-separated shard counts, e.g. 1,2,3: N `healthd serve` processes behind HAProxy "
                        "(deploy/haproxy/haproxy.cfg) instead of --targets; 1 also measures the shard direct")
    p.add_argument("--jobs", type=int, default=0,
                   help="split --ranks over this many jobs (default: 1, or 64 with --shards so the hash spreads)")
    p.add_argument("--rounds", type=int, default=1, help="with --shards: repeat the shard counts, interleaved")
    args = p.parse_args()
    if args.shards:
        _main_shards(args)
        return
    args.jobs = args.jobs or 1
    print(f"{args.ranks} ranks, {args.reports_per_request} reports/request from {args.ranks_per_request} rank(s), "
          f"{args.connections} connections, "
          f"server on 1 core ({os.cpu_count()} CPUs here), "
          f"engine.rank_rules_cpu_share={args.rank_rules_cpu_share}, {len(ALL_RULES)} rules")
    results = {}
    for target in ([] if args.soak_seconds else args.targets.split(",")) or ["healthd"]:
        results[target] = r = bench(target, args)
        print(f"{target:8s} " + "  ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)
    for ceiling in ("bare", "bare-rsgi"):
        if ceiling in results and "healthd" in results:
            ratio = results["healthd"]["reports_per_second"] / results[ceiling]["reports_per_second"]
            print(f"healthd / {ceiling} = {ratio:.2f}")


def _main_shards(args: argparse.Namespace) -> None:
    args.jobs = args.jobs or 64
    counts = [int(x) for x in args.shards.split(",")]
    print(f"{args.ranks} ranks in {args.jobs} jobs, {args.reports_per_request} reports/request from "
          f"{args.ranks_per_request} rank(s), {args.connections} connections, shards {counts} behind HAProxy; "
          f"NOT isolated: the proxy, every shard and this load generator share this machine's "
          f"{os.cpu_count()} CPUs (load average at start {os.getloadavg()[0]:.2f}); the shards' windows start "
          f"empty (no prefill)", flush=True)
    for r in range(args.rounds):
        for n in counts:
            with tempfile.TemporaryDirectory(prefix=f"healthd-shards{n}-") as tmp:
                for name, row in bench_shards(n, args, Path(tmp)).items():
                    label = f"{name}" + (f"#{r + 1}" if args.rounds > 1 else "")
                    print(f"{label:10s} " + "  ".join(f"{k}={v:.1f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
