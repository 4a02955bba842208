"""Cardinality caps: how many jobs, named streams per job, ranks per stream and layer names per stream
healthd tracks; and one monitor per (job, rank, stream).

Each cap bounds the series ``/metrics`` exposes and the memory the store holds, so one
misconfigured client (a rank number that is really a PID, layer names with a step in
them) cannot take healthd down for every other job. A report past a cap is refused
with an error naming the cap (``limits.max_ranks_per_job``); for layers only the new
layer names past the cap are cut from the report, so the step's other signals are kept.

A (job, rank, stream) is one monitor's step stream: an attach report from another monitor
(``AttachReport.monitor_id``) while the first is open and heard from within
``limits.stream_owner_live_seconds`` is refused (``stream_in_use``), so a misconfigured second
process (same RANK, no ``stream=``) is told at once instead of silently sharing the first's windows.

What lives here: one pure admission check against the store's current state. What
does not: counting (the caller increments ``healthd_cardinality_rejections_total``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from healthd.settings import LimitSettings
from healthd.state.store import JobState, Store
from healthd.wire.records import StepRecord
from healthd.wire.schema import AttachReport, FieldError


@dataclass(frozen=True)
class Admission:
    """What to apply (``report``, maybe trimmed; None: nothing) and why something was refused."""

    report: Any | None
    cap: str | None = None  # "max_jobs", "max_streams_per_job", "max_ranks_per_job", "max_layers_per_job"
    error: FieldError | None = None


def admit(store: Store, limits: LimitSettings, report: Any, index: int, now: float = 0.0) -> Admission | None:
    """Check one validated report against the caps, given what the store holds now. None: the report
    is admitted as it is (the common case, answered without building an ``Admission``). ``now``: the
    server's clock, for whether a stream's monitor is still live."""
    job = store.jobs.get(report.job)
    if job is None:
        if len(store.jobs) >= limits.max_jobs:
            return _refuse("max_jobs", limits.max_jobs, ["reports", index, "job"],
                           f"job {report.job!r} refused: healthd already tracks {limits.max_jobs} jobs")
        return None
    stream = report.stream
    if stream is not None:
        sub = job.streams.get(stream)
        if sub is None:
            if len(job.streams) >= limits.max_streams_per_job:
                return _refuse("max_streams_per_job", limits.max_streams_per_job, ["reports", index, "stream"],
                               f"stream {stream!r} refused: job {report.job!r} already has "
                               f"{len(job.streams)} named streams ({', '.join(sorted(job.streams))})")
            return None
        job = sub
    if isinstance(report, AttachReport):
        taken = _stream_in_use(job, report, limits, index, now)
        if taken is not None:
            return taken
    if report.rank not in job.ranks and len(job.ranks) >= limits.max_ranks_per_job:
        return _refuse("max_ranks_per_job", limits.max_ranks_per_job, ["reports", index, "rank"],
                       f"rank {report.rank} refused: job {report.job!r} already has "
                       f"{limits.max_ranks_per_job} ranks")
    if not isinstance(report, StepRecord):
        return None
    known = job.layer_names
    if report.layers.keys() <= known and report.activations.keys() <= known:
        return None  # the common case: no new layer names
    new = [n for n in dict.fromkeys([*report.layers, *report.activations]) if n not in known]
    room = limits.max_layers_per_job - len(known)
    if len(new) <= room:
        return None
    dropped = set(new[max(room, 0):])
    trimmed = msgspec.structs.replace(report, layers={n: v for n, v in report.layers.items() if n not in dropped},
                      activations={n: v for n, v in report.activations.items() if n not in dropped})
    first = new[max(room, 0)]
    field = "layers" if first in report.layers else "activations"
    refused = _refuse("max_layers_per_job", limits.max_layers_per_job, ["reports", index, field, first],
                      f"{len(dropped)} new layer name(s) dropped from this step, first {first!r}: job "
                      f"{report.job!r} already has {len(known)} layer names; the step's other data was kept")
    return Admission(trimmed, refused.cap, refused.error)


def _stream_in_use(job: JobState, report: AttachReport, limits: LimitSettings, index: int,
                   now: float) -> Admission | None:
    """The refusal of an attach from a second monitor of a (job, rank, stream) whose first is live."""
    st = job.ranks.get(report.rank)
    if st is None or st.attach is None or st.closed or now - st.last_seen > limits.stream_owner_live_seconds:
        return None
    held = st.attach.monitor_id
    if held is None or report.monitor_id is None or held == report.monitor_id:
        return None
    where = f"job {report.job!r}, rank {report.rank}, stream {report.stream!r}"
    return Admission(None, None, FieldError(
        loc=["reports", index, "monitor_id"], type="stream_in_use",
        msg=f"another monitor is attached to {where} and still reporting: two monitors would interleave their "
            f"steps in one window. Give each model/optimizer its own attach(..., stream=\"name\") "
            f"(or its own rank); healthd accepts a new monitor here once the first closes or is silent for "
            f"limits.stream_owner_live_seconds = {limits.stream_owner_live_seconds:g}"))


def _refuse(cap: str, limit: int, loc: list[str | int], detail: str) -> Admission:
    return Admission(None, cap, FieldError(
        loc=loc, msg=f"{detail} (limits.{cap} = {limit})", type="cardinality_cap"))
