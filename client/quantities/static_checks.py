"""StaticChecks: structural facts about the model, found once at attach.

Finds (AttachReport ``static_findings``):
- ``dropout_before_batchnorm``: a dropout module directly followed by a
  batch-norm module among a container's children (registration order, which
  is the execution order for ``nn.Sequential``); healthd's
  DropoutBeforeBatchNorm.
- ``batchnorm`` / ``sync_batchnorm``: each batch-norm layer (SyncBatchNorm
  separately), for healthd's BatchNormSmallBatch (which also needs the batch
  size of the steps).
- ``frozen_in_optimizer`` + ``trainable_not_in_optimizer`` (one per layer, under the
  names the step reports use): the optimizer holds tensors whose ``requires_grad``
  is False while tensors that require a gradient are missing from it: the optimizer
  was built before ``get_peft_model`` (which freezes the base model and adds the
  adapters), or before unfreezing a head; healthd's WeightsNotUpdating names the
  layers that will never train. Either alone is ordinary (a frozen layer left in the
  optimizer; a GAN's two optimizers each holding half the model), so neither is sent
  without the other.

Nothing is measured per step.
"""

from __future__ import annotations

import torch

from healthd_client.layers import layer_names, optimizer_params, sanitize_layer_name, unwrap_model
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
        found[:0] = optimizer_coverage(ctx.model, ctx.optimizer)  # first: the cap below never drops them
        if found:
            ctx.attach_report.setdefault("static_findings", []).extend(found[:_MAX_FINDINGS])


def optimizer_coverage(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, str]]:
    """``frozen_in_optimizer`` and ``trainable_not_in_optimizer`` findings, or none unless both hold."""
    held = optimizer_params(optimizer)
    frozen = [p for p in held if not p.requires_grad]
    if not frozen:
        return []
    ids = {id(p) for p in held}
    missing: dict[str, int] = {}  # layer name -> trainable elements the optimizer does not hold
    seen: set[int] = set()
    for name, module in layer_names(model):
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad and id(p) not in ids:
                layer = sanitize_layer_name(name)
                missing[layer] = missing.get(layer, 0) + p.numel()
    if not missing:
        return []
    summary = (f"{len(frozen)} of the {len(held)} tensors the optimizer holds have requires_grad=False "
               f"({sum(p.numel() for p in frozen)} elements); {len(missing)} layers with trainable tensors "
               f"({sum(missing.values())} elements) are not in it")
    return [{"check": "frozen_in_optimizer", "detail": summary[:256]},
            *({"check": "trainable_not_in_optimizer", "layer": layer, "detail": f"{n} trainable elements"}
              for layer, n in missing.items())]
