"""healthd.rules.gpu_memory_leak: allocated GPU memory rising steadily over the window."""

from __future__ import annotations

import pytest

from healthd.rules.gpu_memory_leak import GPUMemoryLeak
from healthd.wire.schema import GpuReport
from tests.healthd.factories import TOTAL, rank_window, series


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


def test_config_validates_with_value_errors() -> None:
    with pytest.raises(ValueError):
        GPUMemoryLeak.Config(increase_points=0)
