"""In-process cost of rank-rule evaluation on the ingest path: ``Healthd.ingest`` of realistic bodies.

Usage (run it against another checkout to compare, e.g. before/after a change to the pipeline)::

    PYTHONPATH=. .venv/bin/python bench/rank_eval.py --ranks 256
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/rank_eval.py --ranks 256

No HTTP and no load generator: one process builds every request body first (``--ranks`` ranks of
one job, each request one rank's ``--steps-per-request`` consecutive steps, values as in
``bench/ingest.py``), then times ``Healthd.ingest`` of all of them, three ways: all of
``ALL_RULES`` with no CPU budget (``rank_rules_cpu_share: 1``: every rank judged before its request
is answered), the same with the default budget followed by ``settle()`` (what a starved server does
eventually), and no rules at all (the store and parsing alone). Printed per way: the best of
``--repeats`` runs in microseconds per step, and rank evaluations (``Engine.evaluation_count``).
The first ``--warmup-steps`` steps of each rank are ingested before timing, so rules see full windows.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from healthd.rules import ALL_RULES
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings

LAYERS = ("embed", "block.0", "block.1", "head")


def _body(rank: int, start: int, n: int, rng: random.Random) -> bytes:
    reports = []
    for s in range(start, start + n):
        loss = 2.5 * (1 + s) ** -0.3 + rng.random() * 0.01
        reports.append({"kind": "step", "job": "bench", "rank": rank, "time": 1.0, "step": s,
                        "loss": loss, "batch_size": 32, "step_seconds": 0.1, "lr": [3e-4],
                        "grad_norm": 1.0 + rng.random() * 0.1, "update_ratio": 1e-3 * (1 + rng.random() * 0.1),
                        "layers": {name: {"grad_norm": 0.5 + rng.random() * 0.01,
                                          "update_ratio": 1e-3 * (1 + rng.random() * 0.1)} for name in LAYERS}})
    return json.dumps({"schema_version": 1, "reports": reports}).encode()


def _bodies(ranks: int, first: int, last: int, per_request: int) -> list[bytes]:
    rng = random.Random(0)
    return [_body(rank, start, per_request, rng) for start in range(first, last, per_request) for rank in range(ranks)]


def run(args: argparse.Namespace, engine: dict[str, float], with_rules: bool, settle: bool) -> tuple[float, int]:
    """(best microseconds per step, rank evaluations in that run)."""
    warm = _bodies(args.ranks, 0, args.warmup_steps, args.steps_per_request)
    timed = _bodies(args.ranks, args.warmup_steps, args.warmup_steps + args.steps, args.steps_per_request)
    best, evaluations = float("inf"), 0
    for _ in range(args.repeats):
        hd: Healthd = build(Settings.from_mapping({"engine": engine}), rules=ALL_RULES if with_rules else [])
        for body in warm:
            hd.ingest(body)
        hd.settle()
        before = hd.engine.evaluation_count
        t0 = time.perf_counter()
        for body in timed:
            hd.ingest(body)
        if settle:
            hd.settle()
        took = time.perf_counter() - t0
        if took < best:
            best, evaluations = took, hd.engine.evaluation_count - before
    return 1e6 * best / (args.ranks * args.steps), evaluations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="timed steps per rank")
    p.add_argument("--warmup-steps", type=int, default=200, help="steps per rank ingested before timing")
    p.add_argument("--steps-per-request", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ways = (("rules, no budget", {"rank_rules_cpu_share": 1.0}, True, False),
            ("rules, default budget + settle", {}, True, True),
            ("no rules", {"rank_rules_cpu_share": 1.0}, False, False))
    for label, engine, with_rules, settle in ways:
        us, evaluations = run(args, engine, with_rules, settle)
        print(f"{label:32s} {us:8.1f} us/step  {evaluations:7d} rank evaluations "
              f"({args.ranks} ranks x {args.steps} steps, {args.steps_per_request} steps/request)")


if __name__ == "__main__":
    main()
