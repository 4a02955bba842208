"""Table tests for the GPU rules: plain GPU sample series in, findings out."""

from __future__ import annotations

from typing import Any

import pytest

from healthd.rules.gpu_hardware_errors import GPUHardwareErrors
from healthd.rules.gpu_imbalance import GPUImbalance
from healthd.rules.gpu_memory_leak import GPUMemoryLeak
from healthd.rules.gpu_memory_near_limit import GPUMemoryNearLimit
from healthd.rules.gpu_throttling import GPUThrottling
from healthd.rules.low_gpu_utilization import LowGPUUtilization
from healthd.rules.small_batch_underutilization import SmallBatchUnderutilization
from healthd.state.windows import JobMeta, JobWindow, RankStatus, RankWindow
from healthd.wire.schema import GpuReport, Severity
from tests.healthd.factories import steps

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


# ---------------------------------------------------------------- GPUMemoryNearLimit
@pytest.mark.parametrize(
    ("used_gib", "torch_peak_gib", "fires"),
    [
        (60, 60, False),
        (77, None, True),  # NVML sees 96%
        (60, 77, True),  # the allocator's high-water mark was 96% between samples
        (75, 75.5, False),  # 94%
    ],
)
def test_memory_near_limit(used_gib: float, torch_peak_gib: float | None, fires: bool) -> None:
    peak = None if torch_peak_gib is None else int(torch_peak_gib * GIB)
    w = rank_window([*series(5), sample(5, memory_used_bytes=int(used_gib * GIB), torch_peak_bytes=peak)])
    f = GPUMemoryNearLimit().evaluate(w)
    assert (f is not None) is fires
    if f:
        assert f.rank == 0 and "Rank 0" in f.summary and f.evidence["peak_ratio"] >= 0.95 and f.step == 4


def test_memory_near_limit_needs_a_total() -> None:
    assert GPUMemoryNearLimit().evaluate(rank_window([sample(0, memory_total_bytes=None)])) is None
    assert GPUMemoryNearLimit().evaluate(rank_window([])) is None


# ---------------------------------------------------------------- GPUMemoryLeak
def _alloc(percents: list[float]) -> list[GpuReport]:
    return series(len(percents), torch_allocated_bytes=[int(p / 100 * TOTAL) for p in percents])


@pytest.mark.parametrize(
    ("percents", "fires"),
    [
        ([20 + 0.2 * i for i in range(60)], True),  # +12 points, steadily
        ([20 + 0.05 * i for i in range(60)], False),  # +3 points: under the 5-point threshold
        ([20.0] * 60, False),  # flat
        ([20 + (10 if 20 <= i < 40 else 0) for i in range(60)], False),  # up then down: not monotonic
        ([20 + 0.2 * i for i in range(30)], False),  # not enough samples yet
    ],
)
def test_memory_leak(percents: list[float], fires: bool) -> None:
    f = GPUMemoryLeak().evaluate(rank_window(_alloc(percents)))
    assert (f is not None) is fires
    if f:
        assert f.evidence["increase_points"] > 5 and f.rank == 0


# ---------------------------------------------------------------- LowGPUUtilization / SmallBatchUnderutilization
@pytest.mark.parametrize(
    ("util", "used_gib", "low_fires", "small_fires"),
    [
        ([0.95] * 24, 60, False, False),  # busy
        ([0.3] * 24, 60, True, False),  # idle GPU, memory well used: pipeline bottleneck
        ([0.3] * 24, 10, False, True),  # idle GPU and memory mostly empty: batch too small
        ([0.3] * 20 + [0.99] * 4, 60, False, False),  # p95 sees the busy moments
        ([0.3] * 8, 60, False, False),  # too few samples
    ],
)
def test_low_utilization_and_small_batch(util: list[float], used_gib: int, low_fires: bool,
                                         small_fires: bool) -> None:
    w = rank_window(series(len(util), utilization_gpu_ratio=util, memory_used_bytes=used_gib * GIB))
    low, small = LowGPUUtilization().evaluate(w), SmallBatchUnderutilization().evaluate(w)
    assert (low is not None) is low_fires
    assert (small is not None) is small_fires
    if small:
        assert "batch size 32" in small.summary
    if low:
        assert low.evidence["utilization_p95"] == pytest.approx(0.3)


def test_mig_samples_without_utilization_are_not_judged_idle() -> None:
    w = rank_window(series(24, utilization_gpu_ratio=None, mig=True, memory_used_bytes=5 * GIB))
    assert LowGPUUtilization().evaluate(w) is None and SmallBatchUnderutilization().evaluate(w) is None


# ---------------------------------------------------------------- GPUThrottling
@pytest.mark.parametrize(
    ("reasons", "fires"),
    [
        ([["hw_thermal_slowdown"]] * 12, True),
        ([["sw_thermal_slowdown"]] * 6 + [[]] * 6, True),  # half the window
        ([["hw_power_brake_slowdown"]] * 2 + [[]] * 10, False),  # a blip
        ([["sw_power_cap"]] * 12, False),  # at the power cap under full load: by design
        ([["gpu_idle"]] * 12, False),
    ],
)
def test_throttling(reasons: list[list[str]], fires: bool) -> None:
    f = GPUThrottling().evaluate(rank_window(series(12, throttle_reasons=reasons, temperature_celsius=91.0)))
    assert (f is not None) is fires
    if f:
        assert "91.0 C" in f.summary and f.evidence["hostname"] == "node-1"


def test_throttling_power_cap_can_be_opted_in() -> None:
    rule = GPUThrottling(GPUThrottling.Config(reasons=("sw_power_cap",)))
    assert rule.evaluate(rank_window(series(12, throttle_reasons=[["sw_power_cap"]] * 12))) is not None


# ---------------------------------------------------------------- GPUHardwareErrors
@pytest.mark.parametrize(
    ("last", "fires", "severity"),
    [
        (dict(xid_events=[79]), True, None),  # fell off the bus: critical (the rule's default)
        (dict(xid_events=[48]), True, None),  # double-bit ECC
        (dict(xid_events=[13, 43]), False, None),  # application errors, not hardware
        (dict(ecc_uncorrected_total=3), True, None),
        (dict(remapped_rows_failure=True), True, None),
        (dict(remapped_rows_pending=True), True, Severity.WARNING),
        (dict(ecc_uncorrected_total=0, remapped_rows_failure=False, remapped_rows_pending=False), False, None),
    ],
)
def test_hardware_errors(last: dict[str, Any], fires: bool, severity: Severity | None) -> None:
    f = GPUHardwareErrors().evaluate(rank_window([*series(5), sample(5, **last)]))
    assert (f is not None) is fires
    if f:
        assert f.severity is severity and f.rank == 0 and "node-1" in f.summary
    assert GPUHardwareErrors.severity is Severity.CRITICAL


def test_xid_leaves_the_window() -> None:
    w = rank_window([sample(0, xid_events=[79]), *series(12)])
    assert GPUHardwareErrors().evaluate(w) is None


# ---------------------------------------------------------------- GPUImbalance (job scope)
@pytest.mark.parametrize(
    ("util", "mem_gib", "fires", "what"),
    [
        ([0.9, 0.9, 0.9, 0.9], [60, 60, 60, 60], False, None),
        ([0.9, 0.9, 0.5, 0.9], [60, 60, 60, 60], True, "utilization 50% on rank 2"),
        ([0.9, 0.9, 0.9, 0.9], [60, 20, 60, 60], True, "memory 25% on rank 1"),
        ([0.9, 0.8, 0.85, 0.9], [60, 55, 60, 65], False, None),  # within the spreads
    ],
)
def test_imbalance(util: list[float], mem_gib: list[int], fires: bool, what: str | None) -> None:
    w = job_window({r: series(12, r, utilization_gpu_ratio=u, memory_used_bytes=m * GIB)
                    for r, (u, m) in enumerate(zip(util, mem_gib, strict=True))})
    f = GPUImbalance().evaluate(w)
    assert (f is not None) is fires
    if f:
        assert f.rank is None and what is not None and what in f.summary


def test_imbalance_ignores_closed_stale_and_single_ranks() -> None:
    busy, idle = series(12, 0), series(12, 1, utilization_gpu_ratio=0.1)
    assert GPUImbalance().evaluate(job_window({0: busy, 1: idle}, closed=(1,))) is None
    assert GPUImbalance().evaluate(job_window({0: busy})) is None
    stale = [s.model_copy(update={"time": 1.0}) for s in idle]
    assert GPUImbalance().evaluate(job_window({0: busy, 1: stale})) is None


def test_imbalance_compares_mig_slices_and_torch_memory() -> None:
    # A MIG slice (no utilisation, torch's reserved bytes only) and a sample without a device total.
    w = job_window({0: series(12, 0), 1: series(12, 1, utilization_gpu_ratio=None, memory_used_bytes=None,
                                                torch_reserved_bytes=20 * GIB),
                    2: series(12, 2, memory_total_bytes=[TOTAL] * 11 + [None])})
    f = GPUImbalance().evaluate(w)
    assert f is not None and "memory 25% on rank 1 vs 75% on rank 0" in f.summary
    assert f.evidence["utilization_spread"] == 0.0 and f.evidence["ranks_compared"] == 3


def test_configs_validate_with_value_errors() -> None:
    with pytest.raises(ValueError):
        LowGPUUtilization.Config(p95_below_ratio=1.5)
    with pytest.raises(ValueError):
        GPUMemoryLeak.Config(increase_points=0)
