"""ModelSummary: the model's size and layers, sent once in the AttachReport.

``param_count`` / ``trainable_count`` count elements of all the model's
parameters (trainable: ``requires_grad``); ``layers`` are the layers the step
reports use (the optimizer's parameters grouped by module, folded into "other"
beyond ``max_layers``), with each layer's module type, element count and tensor
shapes.

Writes (AttachReport): ``model``.
"""

from __future__ import annotations

from healthd_client.layers import unwrap_model
from healthd_client.quantities.base import Quantity, QuantityContext


class ModelSummary(Quantity):
    name = "model_summary"

    def __init__(self) -> None:
        super().__init__(every_steps=0)

    def on_attach(self, ctx: QuantityContext) -> None:
        params = list(unwrap_model(ctx.model).parameters())
        ctx.attach_report["model"] = {
            "param_count": sum(p.numel() for p in params),
            "trainable_count": sum(p.numel() for p in params if p.requires_grad),
            "layers": [
                {
                    "name": layer.name,
                    "module_type": layer.module_type[:256],
                    "params": layer.numel,
                    "shapes": [list(shape) for shape in layer.shapes],
                }
                for layer in ctx.plan.layers
            ],
        }
