"""healthd.rules.gpu_memory_near_limit: peak GPU memory (NVML or the allocator's high-water mark) near the device."""

from __future__ import annotations

import pytest

from healthd.rules.gpu_memory_near_limit import GPUMemoryNearLimit
from tests.healthd.factories import GIB, rank_window, sample, series


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
