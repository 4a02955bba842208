"""Small builders of reports and windows for table tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from healthd.state.windows import JobMeta, RankWindow
from healthd.wire.records import StepRecord, to_record
from healthd.wire.schema import AttachReport, LayerStats, StepReport


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
