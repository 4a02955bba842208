"""Prometheus exposition: a custom Collector that reads the store at scrape time.

Registered on a private ``CollectorRegistry`` built by ``create_app`` (never the
global one). Every name comes from ``healthd.exposition.catalog``. A scrape only reads: jobs silent
for longer than the store's TTL are expired by the server's tick (``Healthd.tick_slices``), and their
series vanish from the scrape after it. ``Collected`` hands families collected on the event loop to
prometheus_client's encoders in another thread (``healthd.server.routes``).

What a scrape shows per rank: the last value of each step signal, its max/min
over the exporter window (``*_window_max``/``*_window_min``, so a spike
between two scrapes is still seen), counters of steps and non-finite tensors,
and the step itself as a gauge. Per layer: the latest statistics from one rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from healthd.engine.alerts import Engine
from healthd.engine.scheduler import EvaluationQueue
from healthd.exposition import catalog as C
from healthd.exposition.gpu import gpu_metrics
from healthd.state.store import WINDOWED, Store

_LAST_VALUE_METRIC = {"loss": C.LOSS, "grad_norm": C.GRAD_NORM, "grad_norm_local": C.GRAD_NORM_LOCAL,
                      "update_ratio": C.UPDATE_RATIO, "batch_size": C.BATCH_SIZE, "step_seconds": C.STEP_SECONDS,
                      "loss_scale": C.LOSS_SCALE}


class Counters:
    """healthd's own counters (reports received/rejected, requests)."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.capped: dict[str, int] = {}  # by cap name (limits.max_jobs, ...)
        self.unauthorized = 0
        self.handed_over = 0  # jobs forgotten because they moved to another shard (healthd.server.handover)

    @staticmethod
    def inc(d: dict[str, int], key: str, n: int = 1) -> None:
        d[key] = d.get(key, 0) + n


def _gauge(m: C.Metric) -> GaugeMetricFamily:
    return GaugeMetricFamily(m.family_name, m.help, labels=m.labels)


def _counter(m: C.Metric) -> CounterMetricFamily:
    return CounterMetricFamily(m.family_name, m.help, labels=m.labels)


def _num(v: float | int | None) -> bool:
    return v is not None


class HealthCollector(Collector):
    """Reads the store and engine on every scrape."""

    def __init__(self, store: Store, engine: Engine, counters: Counters,
                 queue: EvaluationQueue, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.engine = engine
        self.counters = counters
        self.clock = clock
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        return (m for m in self.collect_in_slices() if m is not None)

    def collect_in_slices(self) -> Iterator[Metric | None]:
        """``collect`` with a ``None`` between every ``RANKS_PER_SLICE`` ranks: a point where the
        caller may serve other work (``/metrics`` lets ingest in; thousands of ranks take a while). A
        rank's samples are read together; ranks read in different slices are milliseconds apart.
        Reads only: nothing in the store, the engine or the queue changes (expiry is the tick's job)."""
        now = self.clock()
        yield from self._training(now)
        yield from gpu_metrics(self.store)
        yield from self._alerts()
        yield from self._self_metrics()

    RANKS_PER_SLICE = 128

    def _training(self, now: float) -> Iterator[Metric | None]:
        last = {m.name: _gauge(m) for m in (C.STEP, C.LOSS, C.GRAD_NORM, C.GRAD_NORM_LOCAL, C.UPDATE_RATIO,
                                            C.BATCH_SIZE, C.STEP_SECONDS, C.LOSS_SCALE,
                                            C.LAST_REPORT_TIMESTAMP, C.EVAL_LOSS, C.EVAL_ACCURACY,
                                            C.RANK_CLOSED)}
        wmax = {k: _gauge(m) for k, m in C.WINDOW_MAX.items()}
        wmin = {k: _gauge(m) for k, m in C.WINDOW_MIN.items()}
        per_step = {k: SummaryMetricFamily(m.name, m.help, labels=m.labels) for k, m in C.PER_STEP.items()}
        lr = _gauge(C.LEARNING_RATE)
        steps_total = _counter(C.STEPS_TOTAL)
        nonfinite = _counter(C.NONFINITE_TOTAL)
        dropped = _counter(C.CLIENT_DROPPED_TOTAL)
        layer = {m.name: _gauge(m) for m in (C.LAYER_GRAD_NORM, C.LAYER_UPDATE_RATIO, C.LAYER_PARAM_NORM)}
        per_job = {m.name: _gauge(m) for m in (C.GLOBAL_BATCH_SIZE, C.GRADIENT_NOISE_SCALE)}

        for job in self.store:
            for metric, value in ((C.GLOBAL_BATCH_SIZE, job.global_batch_size),
                                  (C.GRADIENT_NOISE_SCALE, job.noise.noise_scale)):
                if value is not None:
                    per_job[metric.name].add_metric([job.name, job.stream or ""], float(value))
            for i, (rank, st) in enumerate(list(job.ranks.items())):  # a copy: ranks may join between slices
                if i and i % self.RANKS_PER_SLICE == 0:
                    yield None
                lv = [job.name, str(rank), job.stream or ""]
                last[C.LAST_REPORT_TIMESTAMP.name].add_metric(lv, st.last_seen)
                s = st.last_step
                if s is not None:
                    last[C.STEP.name].add_metric(lv, float(s.step))
                    for key, value in st.last_values.items():
                        last[_LAST_VALUE_METRIC[key].name].add_metric(lv, value)
                    for i, v in enumerate(s.lr):
                        lr.add_metric([*lv, str(i)], v)
                    steps_total.add_metric(lv, st.steps_total)
                    for kind, n in st.nonfinite_totals.items():
                        nonfinite.add_metric([*lv, kind], n)
                    for key in WINDOWED:
                        hi, lo = st.extremes[key].max(now), st.extremes[key].min(now)
                        if hi is not None and lo is not None:
                            wmax[key].add_metric(lv, hi)
                            wmin[key].add_metric(lv, lo)
                        if st.signal_counts.get(key):  # once a finite value arrived
                            per_step[key].add_metric(lv, count_value=st.signal_counts[key],
                                                     sum_value=st.signal_sums[key])
                if st.evals:
                    e = st.evals[-1]
                    if e.loss is not None:
                        last[C.EVAL_LOSS.name].add_metric(lv, e.loss)
                    if e.accuracy is not None:
                        last[C.EVAL_ACCURACY.name].add_metric(lv, e.accuracy)
                last[C.RANK_CLOSED.name].add_metric(lv, 1.0 if st.closed else 0.0)
                if st.last_heartbeat is not None:
                    dropped.add_metric(lv, st.last_heartbeat.reports_dropped_total)
            for name, ls in job.layers.items():
                lv = [job.name, name, job.stream or ""]
                for metric, value in ((C.LAYER_GRAD_NORM, ls.grad_norm), (C.LAYER_UPDATE_RATIO, ls.update_ratio),
                                      (C.LAYER_PARAM_NORM, ls.param_norm)):
                    if value is not None and not math.isnan(value):
                        layer[metric.name].add_metric(lv, value)

        yield from last.values()
        yield from wmax.values()
        yield from wmin.values()
        yield from per_step.values()
        yield lr
        yield steps_total
        yield nonfinite
        yield dropped
        yield from layer.values()
        yield from per_job.values()

    def _alerts(self) -> Iterator[Metric]:
        g = _gauge(C.ALERT)
        for a in self.engine.firing():
            g.add_metric([a.job, a.rule, a.severity.value, "" if a.rank is None else str(a.rank), a.stream or ""], 1.0)
        yield g

    def _self_metrics(self) -> Iterator[Metric]:
        for metric, values in ((C.REPORTS_RECEIVED_TOTAL, self.counters.received),
                               (C.REPORTS_REJECTED_TOTAL, self.counters.rejected),
                               (C.REQUESTS_TOTAL, self.counters.requests),
                               (C.CARDINALITY_REJECTIONS_TOTAL, self.counters.capped)):
            c = _counter(metric)
            for key, n in sorted(values.items()):
                c.add_metric([key], n)
            yield c
        unauthorized = _counter(C.UNAUTHORIZED_REQUESTS_TOTAL)
        unauthorized.add_metric([], self.counters.unauthorized)
        yield unauthorized
        handed_over = _counter(C.JOBS_HANDED_OVER_TOTAL)
        handed_over.add_metric([], self.counters.handed_over)
        yield handed_over
        t = _counter(C.ALERT_TRANSITIONS_TOTAL)
        for state, n in self.engine.transitions_total.items():
            t.add_metric([state], n)
        yield t
        yield SummaryMetricFamily(C.RULE_EVALUATION_SECONDS.name, C.RULE_EVALUATION_SECONDS.help,
                                  count_value=self.engine.evaluation_count,
                                  sum_value=self.engine.evaluation_seconds_sum)
        jobs = _gauge(C.JOBS)
        jobs.add_metric([], len(self.store.jobs))
        yield jobs
        pending = _gauge(C.RANK_EVALUATIONS_PENDING)
        pending.add_metric([], len(self.queue))
        yield pending
        since = self.queue.oldest_since()
        delay = _gauge(C.RANK_EVALUATION_DELAY_SECONDS)
        delay.add_metric([], 0.0 if since is None else max(0.0, self.clock() - since))
        yield delay
        shed = _counter(C.RANK_CHECKPOINTS_SHED_TOTAL)
        shed.add_metric([], self.queue.shed_total)
        yield shed


# ----------------------------------------------------------------- encoding


class Collected(Collector):
    """Families already collected (``HealthCollector.collect_in_slices``), as the collector
    prometheus_client's ``generate_latest`` functions take: the event loop collects, a worker thread
    encodes (at 2,048 ranks ~4 MiB of text), and the families are snapshots, so the store may change
    meanwhile."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
