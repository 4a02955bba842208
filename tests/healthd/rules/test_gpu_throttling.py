"""healthd.rules.gpu_throttling: NVML reports thermal or power-brake throttling in much of the window."""

from __future__ import annotations

import pytest

from healthd.rules.gpu_throttling import GPUThrottling
from tests.healthd.factories import rank_window, series


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
