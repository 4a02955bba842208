"""OptimizerSummary: the optimizer's class and hyperparameters, sent once at attach.

``hyperparams`` are the scalar entries of param group 0 (``lr``, ``momentum``,
``weight_decay``, ``eps``, flags ...); tuples of scalars are spread into
``name.0``, ``name.1`` (Adam's ``betas``); one-element tensors (a tensor lr) are
read once, here at attach; anything else is left out.

Writes (AttachReport): ``optimizer``.
"""

from __future__ import annotations

from typing import Any

import torch

from healthd_client.quantities.base import Quantity, QuantityContext

_MAX_TEXT = 256


def _scalar(value: Any) -> float | int | bool | str | None:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().cpu())  # attach time: a sync is fine here
    raise TypeError


def hyperparams(group: dict[str, Any]) -> dict[str, float | int | bool | str | None]:
    """The scalar hyperparameters of one param group."""
    out: dict[str, float | int | bool | str | None] = {}
    for key, value in group.items():
        if key == "params" or not isinstance(key, str):
            continue
        items = [(f"{key}.{i}", v) for i, v in enumerate(value)] if isinstance(value, tuple) else [(key, value)]
        for name, v in items:
            try:
                out[name[:_MAX_TEXT]] = _scalar(v)
            except TypeError:
                continue
    return out


class OptimizerSummary(Quantity):
    name = "optimizer_summary"

    def __init__(self) -> None:
        super().__init__(every_steps=0)

    def on_attach(self, ctx: QuantityContext) -> None:
        groups = ctx.optimizer.param_groups
        ctx.attach_report["optimizer"] = {
            "name": type(ctx.optimizer).__name__[:_MAX_TEXT],
            "param_groups": len(groups),
            "hyperparams": hyperparams(groups[0]) if groups else {},
        }
