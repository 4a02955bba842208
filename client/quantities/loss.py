"""Loss: the training loss given to ``monitor.step``, and whether it is finite.

A tensor loss stays on the device (detached; a non-scalar loss is averaged)
until the record is unpacked; a Python number is taken as is. Without a loss
(``monitor.step()`` not called, or called without one) nothing is written.

Writes: ``loss``; ``nonfinite.loss`` = 1 if the loss is NaN or +/-Inf, else 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from healthd_client.quantities.base import Quantity, QuantityContext, StepRecord, nonfinite


class Loss(Quantity):
    name = "loss"

    def on_step_end(self, ctx: QuantityContext, record: StepRecord) -> None:
        loss = record.loss
        if loss is None:
            return
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            record.put(self, "loss", loss if loss.numel() == 1 else loss.float().mean())
        else:
            record.put(self, "loss", float(loss))

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        loss = values["loss"]
        if isinstance(loss, list):  # a 1-element tensor of shape (1,)
            loss = loss[0]
        report["loss"] = float(loss)
        nonfinite(report)["loss"] = 0 if math.isfinite(report["loss"]) else 1
