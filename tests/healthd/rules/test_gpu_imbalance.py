"""healthd.rules.gpu_imbalance: one live rank's GPU utilisation or memory far from the others' (job scope)."""

from __future__ import annotations

import pytest

from healthd.rules.gpu_imbalance import GPUImbalance
from tests.healthd.factories import GIB, TOTAL, job_window, series


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
