"""The cost of one ``/metrics`` scrape at scale: size, server CPU, and how long it holds the event loop.

Usage::

    .venv/bin/python bench/scrape.py                    # 2,048 ranks of one job, 5 scrapes per format
    .venv/bin/python bench/scrape.py --ranks 512 --scrapes 3

In one process, pinned to one CPU (``sched_setaffinity``): a healthd app (``create_app``) is filled
through its own ingest path with ``--ranks`` ranks of one job, each with ``--steps`` step reports
(4 layers, a GPU sample per rank, two NaN steps so alerts fire) spread over the exporter window, so
every rank's ``*_window_max/min`` buckets are full. Then each format is scraped ``--scrapes`` times
through the ASGI app (httpx's ``ASGITransport``, no sockets), the body read raw (never decompressed
by the client). Printed per format (median over the scrapes): body size, wall time, process CPU time
(all threads: the event loop and the encoder's worker thread; httpx's in-memory transport is a small
part of it) and the longest gap a task sleeping 1 ms on the same event loop saw meanwhile (how long
a scrape keeps ingest waiting).

Formats: ``plain`` (no Accept header), ``plain+gzip`` (Accept-Encoding: gzip), ``prometheus`` (the
Accept and Accept-Encoding headers Prometheus 2.x sends: OpenMetrics, gzip). A server that ignores
them answers plain text; ``gzip_of_body_bytes`` is then what gzip would have made of it.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = ("embed", "block.0", "block.1", "head")
FORMATS = {
    "plain": {"Accept-Encoding": "identity"},
    "plain+gzip": {"Accept-Encoding": "gzip"},
    "prometheus": {"Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                             "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                   "Accept-Encoding": "gzip"},
}


def _fill(app: Any, ranks: int, steps: int, clock: list[float], window_seconds: float) -> None:
    hd = app.state.healthd
    start = clock[0]
    for s in range(steps):
        clock[0] = start + s * window_seconds / steps  # the steps span the exporter window
        reports: list[dict[str, Any]] = []
        for rank in range(ranks):
            loss = math.nan if (s == steps - 1 and rank < 2) else 2.5 * (1 + s) ** -0.3 + (rank % 7) * 1e-3
            reports.append({"kind": "step", "job": "bench", "rank": rank, "time": clock[0], "step": s, "loss": loss,
                            "batch_size": 32, "step_seconds": 0.1, "lr": [3e-4], "grad_norm": 1.0 + rank * 1e-4,
                            "grad_norm_local": 1.3, "grad_norm_allreduced": 1.0, "update_ratio": 1e-3,
                            "layers": {name: {"grad_norm": 0.5, "update_ratio": 1e-3} for name in LAYERS}})
            if s == steps - 1:
                reports.append({"kind": "gpu", "job": "bench", "rank": rank, "time": clock[0], "gpu": rank % 8,
                                "uuid": f"GPU-{rank:05d}", "hostname": f"node-{rank // 8}",
                                "memory_used_bytes": 6 * 10**10, "memory_total_bytes": 8 * 10**10,
                                "utilization_gpu_ratio": 0.9, "temperature_celsius": 60.0, "power_watts": 500.0})
        for i in range(0, len(reports), 1000):
            status, _ = hd.ingest(json.dumps({"schema_version": 1, "reports": reports[i:i + 1000]}).encode())
            assert status == 200, status
    hd.settle()  # no rank evaluation left queued: the scrapes below measure the scrape alone


async def _scrape(app: Any, headers: dict[str, str]) -> dict[str, Any]:
    import httpx

    gaps: list[float] = []
    done = False

    async def neighbour() -> None:  # a task sharing the loop, as ingest would
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            t = time.perf_counter()
            gaps.append(t - last)
            last = t

    task = asyncio.create_task(neighbour())
    await asyncio.sleep(0.01)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        cpu0, t0 = time.process_time(), time.perf_counter()
        async with client.stream("GET", "/metrics", headers=headers) as r:
            body = b"".join([chunk async for chunk in r.aiter_raw()])
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = True
    await task
    assert r.status_code == 200, r.status_code
    text = gzip.decompress(body) if r.headers.get("content-encoding") == "gzip" else body
    return {"bytes": len(body), "text_bytes": len(text), "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
            "loop_held_ms": max(gaps) * 1e3, "content_type": r.headers["content-type"],
            "content_encoding": r.headers.get("content-encoding"), "body": text}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2048)
    p.add_argument("--steps", type=int, default=64, help="step reports per rank, spread over the exporter window")
    p.add_argument("--scrapes", type=int, default=5, help="scrapes per format (the median is printed)")
    p.add_argument("--save", type=Path, help="write the plain-text exposition here (to compare two builds)")
    args = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as healthd serve gets

    from healthd.server.app import create_app
    from healthd.settings import Settings

    settings = Settings.from_mapping({"limits": {"max_ranks_per_job": 100_000}})
    clock = [1_700_000_000.0]  # a fixed start: two builds expose the same values (but measured durations)
    app = create_app(settings, clock=lambda: clock[0])
    t0 = time.perf_counter()
    _fill(app, args.ranks, args.steps, clock, settings.exporter.window_seconds)
    print(f"filled {args.ranks} ranks x {args.steps} steps in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    from healthd.server.gc_policy import ServingGC
    ServingGC().install()  # as `healthd serve` runs (its lifespan would): no young collection walks the store

    async def run() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for name, headers in FORMATS.items():
            out[name] = [await _scrape(app, headers) for _ in range(args.scrapes)]
        return out

    results = asyncio.run(run())
    if args.save:
        args.save.write_bytes(results["plain"][0]["body"])
    for name, runs in results.items():
        first = runs[0]
        row = {"format": name, "ranks": args.ranks, "content_type": first["content_type"],
               "content_encoding": first["content_encoding"], "body_bytes": first["bytes"],
               "text_bytes": first["text_bytes"], "gzip_of_body_bytes": len(gzip.compress(first["body"])),
               **{k: round(statistics.median(r[k] for r in runs), 1) for k in ("wall_ms", "cpu_ms", "loop_held_ms")},
               "cpu_ms_min": round(min(r["cpu_ms"] for r in runs), 1)}
        print(json.dumps(row))


if __name__ == "__main__":
    main()
