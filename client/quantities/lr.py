"""LearningRate: ``param_groups[i]["lr"]`` of every param group, as the optimizer used it.

Read in the step pre-hook, i.e. after any scheduler step that preceded
``optimizer.step()`` and before the ones that follow it. A tensor lr (capturable
optimizers, compiled schedulers) is cloned on its device and packed with the
record, never read on the host in the step. At most 64 groups are reported
(the schema's bound); if a group has no "lr" nothing is written.

Writes: ``lr`` (a list, one float per param group).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.quantities.base import Quantity, QuantityContext

MAX_GROUPS = 64


class LearningRate(Quantity):
    name = "lr"

    def before_step(self, ctx: QuantityContext) -> None:
        record = ctx.record
        if record is None:
            return
        groups = ctx.optimizer.param_groups[:MAX_GROUPS]
        if any("lr" not in group for group in groups):
            return
        host: list[float | None] = []
        for i, group in enumerate(groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                record.put(self, f"lr{i}", lr.detach().clone())  # a scheduler may update it in place
                host.append(None)
            else:
                host.append(float(lr))
        record.put(self, "host", host)

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        lrs = []
        for i, lr in enumerate(values["host"]):
            if lr is None:
                lr = values[f"lr{i}"]
                lr = lr[0] if isinstance(lr, list) else lr
            lrs.append(float(lr))
        report["lr"] = lrs
