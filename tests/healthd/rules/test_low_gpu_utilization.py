"""healthd.rules.low_gpu_utilization and small_batch_underutilization: an idle GPU, told apart by memory use.

The two rules split one case (memory well used: an input-pipeline bottleneck; memory mostly empty: the
batch is too small), so one table says, for each window, which of the two fires."""

from __future__ import annotations

import pytest

from healthd.rules.low_gpu_utilization import LowGPUUtilization
from healthd.rules.small_batch_underutilization import SmallBatchUnderutilization
from tests.healthd.factories import GIB, rank_window, series


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


def test_config_validates_with_value_errors() -> None:
    with pytest.raises(ValueError):
        LowGPUUtilization.Config(p95_below_ratio=1.5)
