"""In-memory state of the jobs healthd tracks: bounded windows per rank.

Each job's state is independent of every other job's (nothing here is shared
across jobs), so jobs can later be sharded across healthd instances. Memory is
bounded per rank (``window_steps`` and friends), never by run length.

A job's rank may carry several named streams (``attach(stream=...)``: a GAN's generator and
discriminator, one monitor each). Each named stream is a ``JobState`` of its own, kept under its
job's (``JobState.streams``): its windows, attach hints, shard groups and layers are its own, so rules
that compare ranks compare one stream's ranks only, and a job's unnamed stream (``store.jobs[name]``)
is what it always was. Expiry and the job caps count jobs, not streams.

What lives here: applying reports, the windows rules read, counters and
window extremes the exporter reads. What does not: rules, alert state.

Why this module is over 400 lines: ``Store`` applies every report kind to one job/rank state and
builds the windows read from it (as of a checkpoint, per stream, per job); both sides must agree on
that state's layout, so they are kept together.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from healthd.settings import StoreSettings
from healthd.state.noise_scale import NoiseScaleEstimator
from healthd.state.shards import ShardCombiner
from healthd.state.windows import COLUMNS, JobMeta, JobWindow, RankStatus, RankWindow, columns_of
from healthd.wire.records import CLEAN, LayerRecord, StepRecord, to_record
from healthd.wire.schema import AttachReport, EvalReport, GpuReport, HeartbeatReport, StepReport


class WindowExtremes:
    """Sliding-window max and min of a signal over ``window_seconds``.

    Kept per bucket of ``window_seconds / 32``: a push is a comparison or two (it runs for every
    step report), a read (at scrape time) scans at most 34 buckets and changes none. The window's far edge is
    bucket-aligned, so a value may count up to one bucket longer than ``window_seconds``.
    """

    __slots__ = ("window", "_width", "_buckets")

    def __init__(self, window_seconds: float) -> None:
        self.window = window_seconds
        self._width = window_seconds / 32
        self._buckets: deque[list[float]] = deque()  # [bucket index, max, min], oldest first

    def push_range(self, t: float, hi: float, lo: float) -> None:
        """Values received at time ``t``: the largest ``hi`` and the smallest ``lo``, both finite (the
        store leaves NaN/Inf out: they are counted by trainhealth_nonfinite_total)."""
        i = t // self._width
        b = self._buckets
        if b and b[-1][0] == i:
            last = b[-1]
            if hi > last[1]:
                last[1] = hi
            if lo < last[2]:
                last[2] = lo
            return
        b.append([i, hi, lo])
        while b[0][0] < i - 33:  # bounded even if nobody reads
            b.popleft()

    def _live(self, now: float) -> list[list[float]]:
        """The buckets inside the window at ``now``. A read leaves older buckets in place (reads never
        mutate: a scrape must not change the store); ``push_range`` drops them."""
        first = (now - self.window) // self._width
        return [x for x in self._buckets if x[0] >= first]

    def max(self, now: float) -> float | None:
        b = self._live(now)
        return max(x[1] for x in b) if b else None

    def min(self, now: float) -> float | None:
        b = self._live(now)
        return min(x[2] for x in b) if b else None


@dataclass
class RankState:
    rank: int
    steps: deque[StepRecord]
    initial_steps: list[StepRecord] = field(default_factory=list)
    evals: deque[EvalReport] = field(default_factory=deque)
    eval_totals: deque[int] = field(default_factory=deque)  # steps_total when each of ``evals`` arrived
    gpu: deque[GpuReport] = field(default_factory=deque)
    attach: AttachReport | None = None
    last_step: StepRecord | None = None
    last_step_time: float | None = None
    last_heartbeat: HeartbeatReport | None = None
    last_heartbeat_time: float | None = None
    last_seen: float = 0.0
    steps_total: int = 0
    nonfinite_totals: dict[str, int] = field(default_factory=lambda: {"loss": 0, "grads": 0, "params": 0})
    extremes: dict[str, WindowExtremes] = field(default_factory=dict)
    # Running sum and count of each windowed signal's finite values (the *_per_step summaries).
    signal_sums: dict[str, float] = field(default_factory=dict)
    signal_counts: dict[str, int] = field(default_factory=dict)
    lr_peak: float | None = None
    gpu_xid_totals: dict[int, int] = field(default_factory=dict)  # XID -> events reported
    # Last known value of each scalar signal: some are measured every N steps only,
    # and a gauge should not vanish on the steps in between.
    last_values: dict[str, float] = field(default_factory=dict)
    # One list per COLUMNS field over at least the last ``window_steps`` steps (``steps`` holds the
    # newest ``detail_steps`` of them whole): what RankWindow.column reads. Lists, not deques: rules
    # slice their tails on every evaluation, and a list slice is a copy at C speed where a deque has
    # to be walked. Trimmed back to window_steps once past 1.25 x window_steps (amortised O(1)).
    columns: dict[str, list[float | None]] = field(default_factory=dict)
    column_lists: tuple[list[float | None], ...] = ()  # the lists of ``columns``, in COLUMNS order
    # (signal, its position in COLUMNS, its extremes) for each WINDOWED signal
    windowed: tuple[tuple[str, int, WindowExtremes], ...] = ()

    @property
    def closed(self) -> bool:
        return bool(self.last_heartbeat and self.last_heartbeat.closing)


WINDOWED = ("loss", "grad_norm", "update_ratio", "step_seconds")
LAST_VALUE_FIELDS = ("loss", "grad_norm", "grad_norm_local", "update_ratio", "batch_size", "step_seconds",
                     "loss_scale")
_LAST_VALUE_AT = tuple((k, COLUMNS.index(k)) for k in LAST_VALUE_FIELDS)  # every one of them is a column
_LR_AT = COLUMNS.index("lr")
# Runs an iterator for its side effects, keeping nothing.
_consume: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend


@dataclass
class JobState:
    name: str
    stream: str | None = None  # None: the job's unnamed stream, which holds the named ones in ``streams``
    streams: dict[str, JobState] = field(default_factory=dict)
    ranks: dict[int, RankState] = field(default_factory=dict)
    attach: AttachReport | None = None  # rank 0's, or the first seen
    meta: JobMeta = field(default_factory=JobMeta)  # of ``attach``, built when it changes (read every step)
    layers: dict[str, LayerRecord] = field(default_factory=dict)  # latest per-layer stats
    layers_rank: int | None = None
    layer_names: set[str] = field(default_factory=set)  # every layer name seen (limits.max_layers_per_job)
    # Distributed: examples per optimizer step over all ranks, and B_simple's smoothed parts.
    global_batch_size: int | None = None
    noise: NoiseScaleEstimator = field(default_factory=NoiseScaleEstimator)
    shards: ShardCombiner | None = None  # a sharded model's (FSDP2, HSDP) steps waiting for their group
    created: float = 0.0
    last_seen: float = 0.0


class Store:
    """All jobs. Single-threaded by design: the ASGI event loop owns it."""

    def __init__(self, settings: StoreSettings, exporter_window_seconds: float = 60.0) -> None:
        self.settings = settings
        self.exporter_window_seconds = exporter_window_seconds
        self.jobs: dict[str, JobState] = {}
        self._trim_at = settings.window_steps + settings.window_steps // 4  # columns' amortised trim

    # ------------------------------------------------------------- writes
    def _job(self, name: str, now: float, stream: str | None = None) -> JobState:
        """The state of stream ``stream`` of job ``name`` (made when new); a report of any stream keeps the
        job alive (``expire``)."""
        job = self.jobs.get(name)
        if job is None:
            job = self.jobs[name] = self._new_state(name, None, now)
        job.last_seen = now
        if stream is None:
            return job
        sub = job.streams.get(stream)
        if sub is None:
            sub = job.streams[stream] = self._new_state(name, stream, now)
        sub.last_seen = now
        return sub

    def _new_state(self, name: str, stream: str | None, now: float) -> JobState:
        return JobState(name=name, stream=stream, created=now,
                        noise=NoiseScaleEstimator(alpha=self.settings.noise_scale_ema_alpha))

    def state(self, name: str, stream: str | None = None) -> JobState | None:
        """The state of one stream of a job (None when healthd has not seen it)."""
        job = self.jobs.get(name)
        if job is None or stream is None:
            return job
        return job.streams.get(stream)

    def streams_of(self, name: str) -> list[JobState]:
        """Every stream's state of a job: the unnamed stream's first, then the named ones by name."""
        job = self.jobs.get(name)
        return [] if job is None else [job, *(job.streams[k] for k in sorted(job.streams))]

    def _rank(self, job: JobState, rank: int) -> RankState:
        st = job.ranks.get(rank)
        if st is None:
            s = self.settings
            extremes = {k: WindowExtremes(self.exporter_window_seconds) for k in WINDOWED}
            columns: dict[str, list[float | None]] = {k: [] for k in COLUMNS}
            st = job.ranks[rank] = RankState(
                rank=rank,
                steps=deque(maxlen=s.detail_steps),
                evals=deque(maxlen=s.evals_kept),
                eval_totals=deque(maxlen=s.evals_kept),
                gpu=deque(maxlen=s.gpu_samples_kept),
                extremes=extremes,
                signal_sums=dict.fromkeys(WINDOWED, 0.0),
                signal_counts=dict.fromkeys(WINDOWED, 0),
                columns=columns,
                column_lists=tuple(columns[k] for k in COLUMNS),
                windowed=tuple((k, COLUMNS.index(k), extremes[k]) for k in WINDOWED),
            )
        return st

    def apply(self, report: StepRecord | StepReport | EvalReport | HeartbeatReport | AttachReport | GpuReport,
              now: float) -> None:
        """Fold one validated report into its job's state (a ``StepReport`` is kept as its record)."""
        if isinstance(report, StepRecord):
            self.apply_steps([report], now)
            return
        if isinstance(report, StepReport):
            self.apply_steps([to_record(report)], now)
            return
        job = self._job(report.job, now, report.stream)
        st = self._rank(job, report.rank)
        st.last_seen = now
        if isinstance(report, EvalReport):
            st.evals.append(report)
            st.eval_totals.append(st.steps_total)
        elif isinstance(report, HeartbeatReport):
            # A retried request can land after a newer one: never let an older
            # heartbeat (and its smaller drop count) replace a newer one.
            if st.last_heartbeat is None or report.time >= st.last_heartbeat.time:
                st.last_heartbeat = report
            st.last_heartbeat_time = now
        elif isinstance(report, AttachReport):
            st.attach = report
            if job.attach is None or report.rank == 0:
                job.attach = report
                job.meta = JobMeta(report)
        elif isinstance(report, GpuReport):
            st.gpu.append(report)
            for xid in report.xid_events:
                st.gpu_xid_totals[xid] = st.gpu_xid_totals.get(xid, 0) + 1

    def apply_steps(self, steps: Sequence[StepRecord], now: float) -> list[tuple[int, Sequence[StepRecord]]]:
        """Fold consecutive step reports of one rank (same job and rank, in order) into its state, as
        ``apply`` of each would. A request carries one rank's queue, so the rank's state is looked up
        once per request and each column is extended once (per-step work is what ingest scales with).

        Returns (rank, the steps applied, in order) per rank that advanced: the request's rank, or, for
        a sharded model (``StepRecord.shard``), the ranks whose steps the request completed
        (healthd.state.shards: a step is applied once every rank of its shard group has reported it)."""
        first = steps[0]
        job = self._job(first.job, now, first.stream)
        combiner = job.shards
        if combiner is None and first.shard is not None:
            combiner = job.shards = ShardCombiner(max_pending_steps=self.settings.detail_steps)
        if combiner is not None and combiner.sharded(first):
            applied: dict[int, list[StepRecord]] = {}
            for s in steps:
                for done in combiner.add(s):
                    self._apply_rank_steps(job, [done], now)
                    applied.setdefault(done.rank, []).append(done)
            self._rank(job, first.rank).last_seen = now
            return list(applied.items())
        self._apply_rank_steps(job, steps, now)
        return [(first.rank, steps)]

    def _apply_rank_steps(self, job: JobState, steps: Sequence[StepRecord], now: float) -> None:
        first = steps[0]
        st = self._rank(job, first.rank)
        st.last_seen = now
        st.steps.extend(steps)
        by_column = columns_of(steps)  # the steps' values, a sequence per column
        lists = st.column_lists
        _consume(map(list.extend, lists, by_column))
        if len(lists[0]) > self._trim_at:
            window = self.settings.window_steps
            for col in lists:
                del col[:-window]
        room = self.settings.initial_steps - len(st.initial_steps)
        if room > 0:
            st.initial_steps.extend(steps[:room])
        last = steps[-1]
        st.last_step = last
        st.last_step_time = now
        st.steps_total += len(steps)
        for s in steps:
            nf = s.nonfinite
            if nf is not CLEAN and (nf.loss or nf.grads or nf.params):
                totals = st.nonfinite_totals
                totals["loss"] += nf.loss
                totals["grads"] += nf.grads
                totals["params"] += nf.params
        sums, counts, last_values = st.signal_sums, st.signal_counts, st.last_values
        for key, at, extremes in st.windowed:
            values: Sequence[Any] = by_column[at]  # floats, and None where a step did not measure it
            # Left to right from the running sum, as adding them one by one. Every value there and finite
            # is the common case: then the values themselves are summed and bounded, with no filtered copy.
            total = sum(values, sums[key]) if None not in values else math.nan
            if not math.isfinite(total):
                values = [v for v in values if v is not None and math.isfinite(v)]
                if not values:
                    continue
                total = sum(values, sums[key])
            extremes.push_range(now, max(values), min(values))
            sums[key] = total
            counts[key] += len(values)
        for key, at in _LAST_VALUE_AT:
            for v in reversed(by_column[at]):
                if v is not None:
                    last_values[key] = v
                    break
        for lr in by_column[_LR_AT]:
            if lr and math.isfinite(lr) and (st.lr_peak is None or lr > st.lr_peak):
                st.lr_peak = lr
        layers_here = job.layers_rank is None or first.rank <= job.layers_rank
        for s in steps:
            if s.layers or s.activations:
                job.layer_names.update(s.layers)
                job.layer_names.update(s.activations)
                if s.layers and layers_here:
                    self._keep_layers(job, s)
            if s.batch_size is not None:
                self._apply_distributed(job, s, s.batch_size)

    @staticmethod
    def _keep_layers(job: JobState, s: StepRecord) -> None:
        """The job's latest per-layer stats, from its lowest-numbered rank that reports them."""
        if job.layers_rank != s.rank:
            job.layers = {}
        job.layers_rank = s.rank
        for name, ls in s.layers.items():
            old = job.layers.get(name)
            # Fields measured every N steps only keep their last known value in between.
            job.layers[name] = ls if old is None else msgspec.structs.replace(ls, **{
                k: getattr(old, k) for k in ("grad_norm", "update_ratio", "param_norm")
                if getattr(ls, k) is None})

    @staticmethod
    def _apply_distributed(job: JobState, s: StepRecord, batch_size: int) -> None:
        """Global batch size and the noise-scale estimate (healthd.state.noise_scale) from one rank's step."""
        meta = job.meta
        local = batch_size * meta.grad_accumulation_steps  # examples behind this rank's local gradient
        job.global_batch_size = local * meta.world_size
        if s.grad_norm_local is not None and s.grad_norm_allreduced is not None and meta.world_size > 1:
            # Each rank's report is one unbiased estimate; the EMA averages them over ranks and steps.
            job.noise.update(s.grad_norm_local**2, s.grad_norm_allreduced**2, local, job.global_batch_size)

    def expire(self, now: float) -> list[str]:
        """Forget jobs silent for longer than the TTL; returns their names."""
        ttl = self.settings.job_ttl_seconds
        gone = [name for name, j in self.jobs.items() if now - j.last_seen > ttl]
        for name in gone:
            del self.jobs[name]
        return gone

    def forget(self, name: str) -> None:
        """Forget one job now, whatever its TTL (it moved to another shard: ``healthd.server.handover``)."""
        self.jobs.pop(name, None)

    # ------------------------------------------------------------- reads
    def rank_window(self, job_name: str, rank: int, new_steps: int = 1, as_of: int | None = None,
                    stream: str | None = None) -> RankWindow:
        """A rank's window. ``as_of``: the window as it was when the rank's ``as_of``-th step (its
        ``steps_total`` then) had just arrived: later steps are left out of ``steps``, ``columns`` and
        ``initial_steps``, and evaluation reports that came after that step out of ``evals`` (the engine
        judges each checkpoint on it, however late its rank's rules run). Other fields (``gpu``,
        ``lr_peak``, ``noise_scale``, ``meta``) are as of now.
        ``stream``: one named stream's rank (None: the unnamed). As far back as the store still holds: a
        window cannot be older than its kept whole steps (``detail_steps``), which is why a checkpoint
        waits only while it is within half of them (``healthd.engine.scheduler``: later ones are shed)."""
        job = self.jobs[job_name] if stream is None else self.jobs[job_name].streams[stream]
        st = job.ranks[rank]
        steps: Sequence[StepRecord] = st.steps
        columns: Mapping[str, Sequence[float | None]] = st.columns
        initial = st.initial_steps
        evals: Sequence[EvalReport] = st.evals
        later = 0 if as_of is None else min(st.steps_total - as_of, len(st.steps) - 1, len(st.column_lists[0]) - 1)
        if as_of is not None and st.eval_totals and st.eval_totals[-1] >= as_of:  # came after the checkpoint step
            evals = [e for e, total in zip(st.evals, st.eval_totals, strict=True) if total < as_of]
        if later > 0:
            steps = list(itertools.islice(st.steps, 0, len(st.steps) - later))
            columns = {k: v[:len(v) - later] for k, v in st.columns.items()}
            initial = initial[:st.steps_total - later]
        return RankWindow(
            job=job_name,
            rank=rank,
            stream=stream,
            meta=job.meta,
            steps=steps,
            evals=evals,
            initial_steps=initial,
            gpu=st.gpu,
            lr_peak=st.lr_peak,
            global_batch_size=job.global_batch_size,
            noise_scale=job.noise.noise_scale,
            new_steps=new_steps,
            columns=columns,
        )

    def expiring(self, now: float) -> list[str]:
        """The jobs ``expire(now)`` would forget, without forgetting them (their final evaluation comes first)."""
        ttl = self.settings.job_ttl_seconds
        return [name for name, j in self.jobs.items() if now - j.last_seen > ttl]

    def silent(self, now: float, seconds: float) -> list[str]:
        """The jobs that sent nothing (not even a heartbeat) for more than ``seconds``: handed over to
        another shard, or gone (``alertmanager.silent_job_seconds``)."""
        return [name for name, j in self.jobs.items() if now - j.last_seen > seconds]

    def job_window(self, job_name: str, now: float, final: bool = False, stream: str | None = None) -> JobWindow:
        job = self.jobs[job_name] if stream is None else self.jobs[job_name].streams[stream]
        slices = self.job_window_slices(job_name, now, ranks_per_slice=len(job.ranks) + 1, final=final,
                                        stream=stream)
        try:
            while True:
                next(slices)
        except StopIteration as built:
            window: JobWindow = built.value  # the generator's return value (StopIteration.value is Any)
            return window

    def job_window_slices(self, job_name: str, now: float, ranks_per_slice: int,
                          final: bool = False, stream: str | None = None) -> Generator[None, None, JobWindow]:
        """``job_window``, pausing (yielding) every ``ranks_per_slice`` ranks; returns the window (of one
        stream's ranks). Each rank is as it is when its slice is built. The window is ``final`` when asked
        (the job is about to expire) or when every rank has closed."""
        job = self.jobs[job_name] if stream is None else self.jobs[job_name].streams[stream]
        ranks: dict[int, RankStatus] = {}
        for i, (r, st) in enumerate(list(job.ranks.items())):
            if i and i % ranks_per_slice == 0:
                yield
            ranks[r] = RankStatus(
                rank=r,
                steps=st.steps,
                last_step=st.last_step.step if st.last_step else None,
                last_step_time=st.last_step_time,
                last_heartbeat=st.last_heartbeat,
                last_heartbeat_time=st.last_heartbeat_time,
                gpu=st.gpu,
                closed=st.closed,
                columns=st.columns,
                shard_index=None if job.shards is None else job.shards.shard_index(r),
            )
        final = final or bool(ranks) and all(st.closed for st in ranks.values())
        return JobWindow(job=job_name, stream=stream, meta=job.meta, now=now, ranks=ranks,
                         global_batch_size=job.global_batch_size, noise_scale=job.noise.noise_scale, final=final)

    def __iter__(self) -> Iterator[JobState]:
        """Every stream's state of every job (a job's unnamed stream first, then its named ones)."""
        return iter([st for name in list(self.jobs) for st in self.streams_of(name)])
