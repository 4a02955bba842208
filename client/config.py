"""MonitorConfig: the client's tunables, with their units in their names.

What lives here: one frozen dataclass and its validation. What does not: anything
that imports torch (``import healthd_client`` must stay light).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

_MAY_BE_ZERO = frozenset({"inspect_first_steps"})


@dataclass(frozen=True)
class MonitorConfig:
    """How often the client measures, how much memory it may use, how it sends.

    Every value is validated in ``__post_init__``; a bad one raises ``ValueError``
    naming the field and its unit.
    """

    # Measurement schedule, in optimizer steps.
    heavy_every_steps: int = 10  # update ratio, parameter norms / non-finite params
    grad_norm_every_steps: int = 1  # per-layer + global grad norm, non-finite grads
    fingerprint_every_steps: int = 50  # parameter checksum for RankDesync (multi-rank jobs only)
    # Forward/loss inspection (activation stats, input stats, loss-input checks) re-reads
    # activations and wraps torch calls: the costliest measurements, so sampled rarely,
    # but on each of the first steps too, where mistakes like softmax-before-loss show first.
    # inspect_first_steps=0 samples no step before the first inspect_every_steps-th: a
    # torch.compile'd training-step function then compiles exactly as often as without healthd
    # (an inspection armed at attach is on the stack when its first graph is built).
    inspect_every_steps: int = 25
    inspect_first_steps: int = 3
    # Per-layer statistics of all-reduced gradients are the same on every DDP rank: only ranks
    # 0..layer_stats_ranks-1 send them, so healthd does not store them world_size times.
    layer_stats_ranks: int = 1
    # Bounds on what is measured.
    max_layers: int = 64  # layers beyond this (smallest first) are folded into "other"
    update_sample_per_tensor: int = 1024  # elements sampled per parameter tensor
    max_pending_records: int = 256  # step records waiting for their device->host copy
    # Sending.
    queue_capacity: int = 10_000  # reports held for sending; the oldest are dropped beyond it
    max_batch_reports: int = 256  # reports per POST
    flush_interval_seconds: float = 0.5
    heartbeat_seconds: float = 5.0
    request_timeout_seconds: float = 2.0
    close_timeout_seconds: float = 5.0
    retry_backoff_min_seconds: float = 0.1
    retry_backoff_max_seconds: float = 10.0
    # GPU (NVML) sampling on a background thread; no effect without CUDA + NVML.
    gpu_sample_seconds: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{f.name} must be an int, got {value!r}")
                least = 0 if f.name in _MAY_BE_ZERO else 1
                if value < least:
                    raise ValueError(f"{f.name} must be >= {least}, got {value}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{f.name} must be a number of seconds, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be finite, got {value}")
                # Only the close bound may be zero ("do not wait at exit").
                if value < 0 or (value == 0 and f.name != "close_timeout_seconds"):
                    raise ValueError(f"{f.name} must be > 0 seconds, got {value}")
        if self.retry_backoff_max_seconds < self.retry_backoff_min_seconds:
            raise ValueError(
                "retry_backoff_max_seconds must be >= retry_backoff_min_seconds, got "
                f"{self.retry_backoff_max_seconds} < {self.retry_backoff_min_seconds}"
            )
