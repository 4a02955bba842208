"""Small builders of reports and windows for table tests: steps, rank and job windows, GPU samples."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import msgspec

from healthd.settings import StoreSettings
from healthd.state.store import Store
from healthd.state.windows import JobMeta, JobWindow, RankStatus, RankWindow
from healthd.wire.records import StepRecord, to_record
from healthd.wire.schema import (
    AttachReport,
    GpuReport,
    HeartbeatReport,
    LayerStats,
    LossInputCheck,
    Severity,
    StepReport,
)


def step(i: int, job: str = "j", rank: int = 0, **kw: Any) -> StepRecord:
    """A step as the store keeps it: validated as a ``StepReport``, kept as its record."""
    layers = kw.pop("layers", {})
    kw.setdefault("time", 1000.0 + i)
    return to_record(StepReport(job=job, rank=rank, step=i, layers={k: LayerStats(**v) for k, v in layers.items()},
                                **kw))


def steps(n: int, start: int = 0, **series: Sequence[Any] | Any) -> list[StepRecord]:
    """``steps(3, loss=[1, 2, 3], lr=[0.1])``: a list value is a per-step series, a scalar is constant."""
    out = []
    for k in range(n):
        kw = {}
        for name, v in series.items():
            if isinstance(v, list | tuple) and name != "lr":
                kw[name] = v[k]
            elif name == "lr" and v and isinstance(v[0], list | tuple):
                kw[name] = list(v[k])
            else:
                kw[name] = v
        out.append(step(start + k, **kw))
    return out


def window(step_list: Sequence[StepRecord], attach: AttachReport | None = None, **kw: Any) -> RankWindow:
    return RankWindow(job="j", rank=0, meta=JobMeta(attach), steps=list(step_list),
                      initial_steps=list(step_list[:20]), **kw)


# ---------------------------------------------------------------- rank-scope rule tables
def attach(**kw: Any) -> AttachReport:
    return AttachReport(job="j", time=1.0, **kw)


def ce(**kw: Any) -> LossInputCheck:
    """A cross-entropy call on (8, 10) logits and (8,) targets; ``fn`` and the checked flags override."""
    return LossInputCheck(fn=kw.pop("fn", "cross_entropy"), input_shape=[8, 10], target_shape=[8], **kw)


def fires(rule: Any, w: Any) -> Severity | None | bool:
    """``False`` when the rule finds nothing, else the severity it fires at (its own or the rule's default)."""
    f = rule.evaluate(w)
    return False if f is None else (f.severity or rule.severity)


healthy_loss = [2.3 * 0.99**i for i in range(60)]
falling = [2.0 * 0.97 ** i + 0.02 * math.sin(i * 1.7) for i in range(40)]


# ---------------------------------------------------------------- job-scope rule tables
NOW = 2000.0


def rank(r: int, *, n: int = 10, last_step_time: float | None = NOW, heartbeat_time: float | None = NOW,
         closing: bool = False, **series: Sequence[Any] | Any) -> RankStatus:
    st: list[StepRecord] = [msgspec.structs.replace(s, rank=r) for s in steps(n, **series)] if n else []
    hb = HeartbeatReport(job="j", rank=r, time=NOW, closing=closing) if heartbeat_time is not None else None
    return RankStatus(rank=r, steps=st, last_step=st[-1].step if st else None,
                      last_step_time=last_step_time if st else None, last_heartbeat=hb,
                      last_heartbeat_time=heartbeat_time, closed=closing)


def job(*ranks: RankStatus, now: float = NOW) -> JobWindow:
    return JobWindow(job="j", meta=JobMeta(), now=now, ranks={r.rank: r for r in ranks})


def ranks_of(findings: Any) -> list[int | None]:
    return sorted(f.rank for f in findings)


def stored_job(reports: list[StepReport]) -> JobWindow:
    """The job window a real Store builds from these reports, so that rules read the store's column paths."""
    store = Store(StoreSettings())
    for rep in reports:
        store.apply(rep, NOW)
    return store.job_window("j", NOW)


def random_job(rng: random.Random) -> list[StepReport]:
    """A few ranks stepping in increasing order, some ahead of others, with missing and non-finite
    values, fingerprints at shared steps, the odd desync, and requests applied twice in a row (a
    client retries a request whose answer it lost before it sends the next)."""
    every = rng.choice([1, 3, 10])
    reports = []
    for r in range(rng.randint(2, 7)):
        scale = rng.choice([1.0, 1.0, 30.0, 0.01])
        slow = rng.choice([1.0, 1.0, 2.0])
        desync = rng.random() < 0.3
        steps_sent = 0
        for _ in range(rng.randint(0, 12)):
            batch = []
            for step_no in range(steps_sent, steps_sent + rng.randint(1, 8)):
                fp = None
                if step_no % every == 0 and rng.random() < 0.9:
                    fp = rng.choice([1.0 + step_no, 0.0, math.nan]) + (1e-3 if desync and step_no > 20 else 0.0)
                batch.append(StepReport(
                    job="j", rank=r, time=NOW, step=step_no, param_fingerprint=fp,
                    step_seconds=rng.choice([0.3 * slow, 0.3 * slow, 0.25, None, math.inf]),
                    comm_seconds=rng.choice([None, 0.1, 0.2, 0.29, 0.4]) if rng.random() < 0.8 else None,
                    grad_norm_local=rng.choice([scale * rng.uniform(0.8, 1.2), None, math.nan, math.inf, 0.0])))
            steps_sent += len(batch)
            reports += batch * (2 if rng.random() < 0.1 else 1)
    return reports


# ---------------------------------------------------------------- GPU rule tables
GIB = 2**30
TOTAL = 80 * GIB


def sample(i: int, rank: int = 0, **kw: Any) -> GpuReport:
    kw.setdefault("memory_total_bytes", TOTAL)
    kw.setdefault("memory_used_bytes", 60 * GIB)
    kw.setdefault("utilization_gpu_ratio", 0.95)
    return GpuReport(job="j", rank=rank, time=1000.0 + i, gpu=0, uuid=f"GPU-{rank}", hostname="node-1", **kw)


def series(n: int, rank: int = 0, **cols: Any) -> list[GpuReport]:
    """``series(3, utilization_gpu_ratio=[.1, .2, .3])``: list values vary per sample, scalars are constant."""
    return [sample(i, rank, **{k: (v[i] if isinstance(v, list) else v) for k, v in cols.items()}) for i in range(n)]


def rank_window(gpu: list[GpuReport], batch_size: int | None = 32) -> RankWindow:
    return RankWindow(job="j", rank=0, meta=JobMeta(), steps=steps(5, batch_size=batch_size), gpu=gpu)


def job_window(per_rank: dict[int, list[GpuReport]], closed: tuple[int, ...] = ()) -> JobWindow:
    ranks = {r: RankStatus(rank=r, steps=[], last_step=None, last_step_time=None, last_heartbeat=None,
                           last_heartbeat_time=None, gpu=g, closed=r in closed) for r, g in per_rank.items()}
    return JobWindow(job="j", meta=JobMeta(), now=1100.0, ranks=ranks)
