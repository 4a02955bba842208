"""StaticChecks: structural facts about the model, found once at attach.

Finds (AttachReport ``static_findings``):
- ``dropout_before_batchnorm``: a dropout module directly followed by a
  batch-norm module among a container's children (registration order, which
  is the execution order for ``nn.Sequential``); healthd's
  DropoutBeforeBatchNorm.
- ``batchnorm`` / ``sync_batchnorm``: each batch-norm layer (SyncBatchNorm
  separately), for healthd's BatchNormSmallBatch (which also needs the batch
  size of the steps).

Nothing is measured per step.
"""

from __future__ import annotations

import torch

from healthd_client.layers import sanitize_layer_name, unwrap_model
from healthd_client.quantities.base import Quantity, QuantityContext

_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)
_MAX_FINDINGS = 64  # the schema allows 256; a few name the problem


class StaticChecks(Quantity):
    name = "static_checks"

    def __init__(self) -> None:
        super().__init__(every_steps=0)

    def on_attach(self, ctx: QuantityContext) -> None:
        model = unwrap_model(ctx.model)
        found: list[dict[str, str]] = []
        for path, module in model.named_modules():
            children = list(module.named_children())
            for (_, a), (b_name, b) in zip(children, children[1:], strict=False):
                if isinstance(a, _DROPOUT) and isinstance(b, torch.nn.modules.batchnorm._BatchNorm):
                    layer = f"{path}.{b_name}" if path else b_name
                    found.append({"check": "dropout_before_batchnorm", "layer": sanitize_layer_name(layer),
                                  "detail": f"{type(a).__name__}(p={a.p}) -> {type(b).__name__}"[:256]})
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                check = "sync_batchnorm" if isinstance(module, torch.nn.SyncBatchNorm) else "batchnorm"
                found.append({"check": check, "layer": sanitize_layer_name(path or "root"),
                              "detail": type(module).__name__})
        if found:
            ctx.attach_report.setdefault("static_findings", []).extend(found[:_MAX_FINDINGS])
