"""Prometheus exposition of the GPU samples (``GpuReport``): called by ``HealthCollector.collect``.

One series per (job, rank, gpu) with the labels of ``catalog.GPU_LABELS``: ``UUID`` and ``GPU_I_ID``
are named as dcgm-exporter names them, so a Grafana query can join healthd's series with DCGM's on
``UUID`` (dcgm-exporter's ``gpu`` label is NVML's index, ours CUDA's as the job sees it: never join on
``gpu``). ``GPU_I_ID`` is empty (absent, to Prometheus) outside MIG. Values are the rank's latest
sample; XID events are counted in the store.

Several streams of one (job, rank) share one GPU sampler, which the client hands from a closing
monitor to an open one (``healthd_client.quantities.gpu``): the device's samples then arrive under
another stream. A device is exported under the stream with its newest sample only, so a hand-over
moves its series to the new stream's labels instead of leaving a frozen copy under the old ones.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from healthd.exposition import catalog as C
from healthd.state.store import JobState, RankState, Store
from healthd.wire.schema import GpuReport

# (metric, GpuReport field) for the plain gauges.
_GAUGES: tuple[tuple[C.Metric, str], ...] = (
    (C.GPU_MEMORY_USED, "memory_used_bytes"),
    (C.GPU_MEMORY_TOTAL, "memory_total_bytes"),
    (C.GPU_TORCH_ALLOCATED, "torch_allocated_bytes"),
    (C.GPU_TORCH_RESERVED, "torch_reserved_bytes"),
    (C.GPU_TORCH_PEAK, "torch_peak_bytes"),
    (C.GPU_UTILIZATION, "utilization_gpu_ratio"),
    (C.GPU_MEMORY_UTILIZATION, "utilization_memory_ratio"),
    (C.GPU_TEMPERATURE, "temperature_celsius"),
    (C.GPU_POWER, "power_watts"),
    (C.GPU_REMAPPED_ROWS_FAILURE, "remapped_rows_failure"),
    (C.GPU_REMAPPED_ROWS_PENDING, "remapped_rows_pending"),
)
_COUNTERS: tuple[tuple[C.Metric, str], ...] = (
    (C.GPU_ENERGY, "energy_joules"),
    (C.GPU_ECC_UNCORRECTED, "ecc_uncorrected_total"),
)


def gpu_labels(job: str, rank: int, stream: str | None, s: GpuReport) -> list[str]:
    """Label values in ``catalog.GPU_LABELS`` order (``stream`` empty for the job's unnamed stream)."""
    gi = "" if s.gpu_instance_id is None else str(s.gpu_instance_id)
    return [job, str(rank), stream or "", str(s.gpu), s.uuid, gi, s.hostname]


def _latest_per_device(samples: list[GpuReport]) -> list[GpuReport]:
    latest: dict[tuple[int, str], GpuReport] = {}
    for s in samples:  # oldest first: later samples win
        latest[(s.gpu, s.uuid)] = s
    return list(latest.values())


def _sampled(store: Store) -> list[tuple[JobState, int, RankState, list[GpuReport]]]:
    """(stream state, rank, its state, the latest sample of each device it exports) for every rank with GPU
    samples; a device that a newer sample of another stream of the same (job, rank) reports is left out."""
    found = [(job, rank, st, _latest_per_device(list(st.gpu))) for job in store for rank, st in job.ranks.items()
             if st.gpu]
    newest: dict[tuple[str, int, int, str], float] = {}
    for job, rank, _, latest in found:
        for s in latest:
            key = (job.name, rank, s.gpu, s.uuid)
            newest[key] = max(newest.get(key, s.time), s.time)
    return [(job, rank, st, [s for s in latest if s.time >= newest[(job.name, rank, s.gpu, s.uuid)]])
            for job, rank, st, latest in found]


def gpu_metrics(store: Store) -> Iterator[Metric]:
    """The GPU metric families, read from the store at scrape time."""
    gauges = {m.name: GaugeMetricFamily(m.family_name, m.help, labels=m.labels) for m, _ in _GAUGES}
    counters = {m.name: CounterMetricFamily(m.family_name, m.help, labels=m.labels) for m, _ in _COUNTERS}
    clock = GaugeMetricFamily(C.GPU_CLOCK_EVENT_ACTIVE.family_name, C.GPU_CLOCK_EVENT_ACTIVE.help,
                              labels=C.GPU_CLOCK_EVENT_ACTIVE.labels)
    xids = CounterMetricFamily(C.GPU_XID_EVENTS.family_name, C.GPU_XID_EVENTS.help, labels=C.GPU_XID_EVENTS.labels)
    for job, rank, st, latest in _sampled(store):
        if not latest:
            continue  # its device moved to another stream (a hand-over): exported there
        for s in latest:
            lv = gpu_labels(job.name, rank, job.stream, s)
            for metric, attr in _GAUGES:
                v = getattr(s, attr)
                if v is not None:
                    gauges[metric.name].add_metric(lv, float(v))
            for metric, attr in _COUNTERS:
                v = getattr(s, attr)
                if v is not None:
                    counters[metric.name].add_metric(lv, float(v))
            for reason in s.throttle_reasons:
                clock.add_metric([*lv, reason], 1.0)
        lv = gpu_labels(job.name, rank, job.stream, st.gpu[-1])
        for xid, n in sorted(st.gpu_xid_totals.items()):
            xids.add_metric([*lv, str(xid)], n)
    yield from gauges.values()
    yield from counters.values()
    yield clock
    yield xids
