"""StepTime: host wall time between consecutive ``monitor.step`` calls.

Measured with ``time.perf_counter`` on the training thread, so it is the time
the training loop took per step (data loading, forward, backward, optimizer and
whatever else the loop does), not GPU time. The first step has none.

Writes: ``step_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from healthd_client.quantities.base import Quantity, QuantityContext, StepRecord


class StepTime(Quantity):
    name = "step_time"

    def __init__(self) -> None:
        super().__init__(every_steps=1)
        self._last: float | None = None

    def on_step_end(self, ctx: QuantityContext, record: StepRecord) -> None:
        if not record.closed_by_user:
            return
        now = time.perf_counter()
        if self._last is not None:
            record.put(self, "seconds", now - self._last)
        self._last = now

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        report["step_seconds"] = max(0.0, float(values["seconds"]))
