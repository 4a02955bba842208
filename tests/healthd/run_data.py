"""A small synthetic run posted over HTTP: attach, steps with per-layer stats, evals, GPU samples, a NaN."""

from __future__ import annotations

import json
import math
from typing import Any

from tests.live import LiveHealthd

JOB = "team/run-7"
NAN_STEP = 40


def attach_report(job: str = JOB, rank: int = 0, world_size: int = 2) -> dict[str, Any]:
    return {
        "kind": "attach", "job": job, "rank": rank, "time": 1000.0, "world_size": world_size,
        "hostname": f"node-{rank}",
        "model": {"param_count": 1234, "trainable_count": 1234, "layers": [
            {"name": "encoder.0", "module_type": "Linear", "params": 1000, "shapes": [[40, 24], [40]]},
            {"name": "head", "module_type": "Linear", "params": 234, "shapes": [[5, 46], [4]]},
        ]},
        "optimizer": {"name": "AdamW", "param_groups": 1, "hyperparams": {"lr": 0.001, "weight_decay": 0.01}},
        "hints": {"dataset_size": 5000, "num_classes": 5},
        "versions": {"torch": "2.13.0", "python": "3.11"},
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
    }


def steps(job: str = JOB, rank: int = 0, n: int = 50) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        nan = i >= NAN_STEP
        out.append({
            "kind": "step", "job": job, "rank": rank, "time": 1000.0 + i, "step": i, "batch_size": 32,
            "loss": math.nan if nan else 2.0 * math.exp(-i / 30) + 0.1 * rank,
            "grad_norm": math.inf if nan else 1.0 + 0.05 * i, "lr": [1e-3], "update_ratio": 1e-3,
            "nonfinite": {"loss": 1, "grads": 2} if nan else {},
            "layers": {"encoder.0": {"grad_norm": 0.8, "update_ratio": 1.2e-3},
                       "head": {"grad_norm": 0.3, "update_ratio": 7e-4 + 1e-5 * i}},
        })
    return out


def evals(job: str = JOB) -> list[dict[str, Any]]:
    return [{"kind": "eval", "job": job, "rank": 0, "time": 1000.0 + s, "step": s, "loss": 2.1 * math.exp(-s / 40),
             "accuracy": 0.2 + s / 100} for s in (10, 20, 30)]


def gpu(job: str = JOB, rank: int = 0) -> list[dict[str, Any]]:
    return [{"kind": "gpu", "job": job, "rank": rank, "time": 1000.0 + t, "gpu": rank, "uuid": f"GPU-{rank}",
             "memory_used_bytes": int((10 + t / 10 + rank) * 2**30), "memory_total_bytes": 80 * 2**30,
             "utilization_gpu_ratio": 0.9 - 0.01 * t} for t in range(0, 40, 5)]


def post_run(live: LiveHealthd, job: str = JOB) -> None:
    reports = [attach_report(job, 0), attach_report(job, 1), *steps(job, 0), *steps(job, 1, n=30),
               *evals(job), *gpu(job, 0), *gpu(job, 1)]
    body = json.dumps({"schema_version": 1, "reports": reports}).encode()
    r = live.post("/v1/reports", content=body)
    assert r.status_code == 200, r.text
