"""Helpers shared by the GPU rules (``gpu_*`` modules): slicing sample windows, percentiles.

GPU samples come from the client's sampler thread (``GpuReport``), one every
``gpu_sample_seconds`` per rank, oldest first; they are not aligned with steps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from healthd.state.windows import RankWindow
from healthd.wire.schema import GpuReport


def last_samples(samples: Sequence[GpuReport], n: int) -> list[GpuReport]:
    """The last ``n`` GPU samples, oldest first (fewer if there are fewer)."""
    size = len(samples)
    return list(itertools.islice(samples, max(0, size - n), size))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation, as numpy's default."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def memory_ratio(s: GpuReport) -> float | None:
    """Device memory in use (NVML's view, else torch's reserved) as a fraction of the device."""
    if not s.memory_total_bytes:
        return None
    used = s.memory_used_bytes if s.memory_used_bytes is not None else s.torch_reserved_bytes
    return None if used is None else used / s.memory_total_bytes


def step_of(window: RankWindow) -> int | None:
    """The rank's latest step, for the finding (GPU samples carry no step)."""
    return window.latest.step if window.latest is not None else None


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def device_label(s: GpuReport) -> str:
    return f"GPU {s.gpu} ({s.uuid}{', MIG' if s.mig else ''}) on {s.hostname or 'unknown host'}"
