"""GPUThrottling: the GPU's clocks are held down for thermal or power reasons."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from pydantic import Field

from healthd.rules._gpu import device_label, last_samples, step_of
from healthd.rules.base import Finding, ResolveAfterSteps, Rule, RuleConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity

# NVML clock event reasons (names as healthd_client sends them) that mean "slowed down by heat or power".
# sw_power_cap is left out by default: a GPU at full load sits at its power cap by design.
DEFAULT_REASONS = ("hw_slowdown", "hw_thermal_slowdown", "sw_thermal_slowdown", "hw_power_brake_slowdown")


class GPUThrottlingConfig(RuleConfig):
    window_samples: int = Field(default=12, ge=1, description="GPU samples looked at (x gpu_sample_seconds)")
    min_fraction: float = Field(default=0.5, gt=0, le=1,
                                description="fraction of those samples with a reason active that warns")
    reasons: tuple[str, ...] = Field(default=DEFAULT_REASONS, min_length=1,
                                     description="clock event reasons that count (add sw_power_cap to include it)")
    resolve_after_steps: ResolveAfterSteps = 50


class GPUThrottling(Rule[RankWindow, GPUThrottlingConfig]):
    """In at least ``min_fraction`` (half) of the last ``window_samples`` samples, NVML reports a thermal
    or power slowdown among the GPU's current clock event reasons.

    Why: a throttled GPU runs at a fraction of its clocks; in a synchronous data-parallel job the whole
    job runs at the speed of its slowest GPU. Thermal slowdowns point at cooling (fans, airflow, a hot
    rack), hardware slowdown and power brake at the power supply or the board: facility problems the
    training code cannot fix.

    Source: NVML ``nvmlDeviceGetCurrentClocksEventReasons``; dcgm-exporter's DCGM_FI_DEV_CLOCK_THROTTLE_REASONS.
    Thresholds: ``min_fraction`` 0.5 of ``window_samples`` 12; ``reasons`` hw_slowdown,
    hw_thermal_slowdown, sw_thermal_slowdown, hw_power_brake_slowdown.
    """

    name: ClassVar[str] = "GPUThrottling"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = GPUThrottlingConfig
    advice: ClassVar[str] = (
        "Check the node's cooling and power (nvidia-smi -q -d PERFORMANCE,TEMPERATURE,POWER): temperatures, "
        "fan and power-supply health, power limits set below default. Tell the cluster operators and move "
        "the job off the node if it persists."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        samples = last_samples(window.gpu, cfg.window_samples)
        if not samples:
            return None
        wanted = set(cfg.reasons)
        seen: Counter[str] = Counter()
        hits = 0
        for s in samples:
            active = wanted.intersection(s.throttle_reasons)
            hits += bool(active)
            seen.update(active)
        fraction = hits / len(samples)
        if hits == 0 or fraction < cfg.min_fraction:
            return None
        latest = samples[-1]
        reasons = ", ".join(r for r, _ in seen.most_common())
        return Finding(
            summary=(f"Rank {window.rank}'s GPU is throttled ({reasons}) in {hits} of the last {len(samples)} "
                     f"samples on {device_label(latest)} at {latest.temperature_celsius or 'n/a'} C"),
            evidence={"reasons": reasons, "throttled_fraction": fraction, "samples": len(samples),
                      "temperature_celsius": latest.temperature_celsius, "power_watts": latest.power_watts,
                      "gpu": latest.gpu, "uuid": latest.uuid, "hostname": latest.hostname},
            step=step_of(window),
            rank=window.rank,
        )
