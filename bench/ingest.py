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
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from healthd.rules import ALL_RULES  # noqa: E402

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


def _body(ranks: range, step: int, per_request: int, rng: random.Random) -> bytes:
    """``per_request`` step reports of ``ranks`` round-robin from ``step`` on: one rank and
    ``per_request`` consecutive steps is what a healthd_client sends (a rank's queue per flush)."""
    reports = []
    for k in range(per_request):
        rank = ranks[k % len(ranks)]
        s = step + k // len(ranks)
        loss = 2.5 * (1 + s) ** -0.3 + rng.random() * 0.01
        reports.append({"kind": "step", "job": "bench", "rank": rank, "time": time.time(), "step": s,
                        "loss": loss, "batch_size": 32, "step_seconds": 0.1, "lr": [3e-4],
                        "grad_norm": 1.0 + rng.random() * 0.1, "update_ratio": 1e-3 * (1 + rng.random() * 0.1),
                        "layers": {name: {"grad_norm": 0.5 + rng.random() * 0.01,
                                          "update_ratio": 1e-3 * (1 + rng.random() * 0.1)} for name in LAYERS}})
    return json.dumps({"schema_version": 1, "reports": reports}).encode()


async def _connection(port: int, bodies: list[bytes], stop_at: float, latencies: list[float],
                      counts: list[int], per_request: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    while time.perf_counter() < stop_at:
        body = bodies[i % len(bodies)]
        i += 1
        head = (f"POST /v1/reports HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        t0 = time.perf_counter()
        writer.write(head + body)
        status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - t0)
        if status_line.split()[1] in (b"200", b"422"):
            counts[0] += per_request
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
            sample["scrape_bytes"] = len(await _get(port, "/metrics"))
            sample["scrape_seconds"] = time.perf_counter() - t0
        samples.append(sample)


def _load(port: int, args: argparse.Namespace, seconds: float, step0: int,
          samples: list[dict[str, float]] | None = None) -> tuple[float, list[float], int]:
    """Drive the server for ``seconds``; returns (reports/s, latencies, failed requests)."""
    rng = random.Random(0)
    per = args.reports_per_request
    width = args.ranks_per_request
    groups = [range(r, min(r + width, args.ranks)) for r in range(0, args.ranks, width)]
    # Each body carries `width` ranks (default 1, like healthd_client) for `per // width` consecutive
    # steps each; bodies cycle through the ranks, then the steps advance.
    advance = max(1, per // width)
    bodies = [_body(g, step0 + s * advance, per, rng) for s in range(args.steps_per_cycle) for g in groups]
    latencies: list[float] = []
    counts = [0, 0]

    async def run() -> float:
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        per_conn = [bodies[c::args.connections] for c in range(args.connections)]
        sampler = [_sample(port, stop_at, samples, args.scrape_seconds)] if samples is not None else []
        await asyncio.gather(*(_connection(port, b, stop_at, latencies, counts, per) for b in per_conn), *sampler)
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
        return out
    finally:
        proc.terminate()
        proc.join(10)


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
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
