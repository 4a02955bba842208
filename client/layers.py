"""Grouping the optimizer's parameter tensors into named layers.

A layer is the parameter tensors directly owned by one module, named by the
module's path ("encoder.layers.1.attn"; the root module's own parameters are
"root"; parameters the optimizer holds that no module owns are "unowned").
There are at most ``max_layers`` layers: beyond that the smallest (by parameter
count) are folded into one layer named "other", so the number of label values
healthd sees stays bounded.

Also here: the per-device index tensors (parameter -> layer) the quantities use
to scatter-add per-tensor values into per-layer sums without a host sync.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from healthd_client.quantities.sharding import ShardLayout, fsdp1_layout, shard_layout

# Must match healthd.wire.schema.LayerName.
_LAYER_NAME_MAX_CHARS = 128
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_.:\-\[\]]")
ROOT = "root"
UNOWNED = "unowned"
OTHER = "other"
_INDEX_CACHE_MAX_ENTRIES = 32


# The attribute under which FSDP1 (FullyShardedDataParallel) holds the module it wraps: a path segment the
# user never wrote, left out so layers keep the user's module names (as in FSDP1's own state_dict keys).
_FSDP1_WRAPPED = "_fsdp_wrapped_module"


def sanitize_layer_name(name: str) -> str:
    """Map a module path onto the schema's LayerName alphabet and length."""
    name = ".".join(part for part in name.split(".") if part != _FSDP1_WRAPPED)
    name = _NOT_ALLOWED.sub("_", name) or ROOT
    if len(name) > _LAYER_NAME_MAX_CHARS:
        # Keep the tail: it names the module, the head is usually shared.
        name = name[-_LAYER_NAME_MAX_CHARS:]
    return name


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under torch.compile / DDP / DataParallel wrappers."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(
            model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel
        ):
            inner = model.module
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner
    return model


def copy_to_device(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that does not synchronise (pinned source, non_blocking)."""
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


@dataclass(frozen=True)
class Layer:
    """One reported layer: a name and the parameters (indices into the plan) in it."""

    name: str
    module_type: str
    param_indices: tuple[int, ...]
    numel: int
    shapes: tuple[tuple[int, ...], ...]


class LayerPlan:
    """The optimizer's parameters, the layers they fold into, and index tensors.

    ``params`` are the unique tensors of ``optimizer.param_groups`` in order;
    ``layer_of_param[i]`` is the index in ``layers`` of ``params[i]``'s layer.
    """

    def __init__(self, params: Sequence[torch.Tensor], layers: Sequence[Layer],
                 layout: ShardLayout | None = None) -> None:
        self.params = list(params)
        # Where this rank's parameters sit in a sharded model (FSDP1's comes from the model, given by
        # build_layer_plan; FSDP2's from the parameters themselves); None when nothing is sharded.
        self.layout = layout if layout is not None else shard_layout(self.params)
        self.layers = list(layers)
        self.names = [layer.name for layer in self.layers]
        self.layer_of_param = [0] * len(self.params)
        for li, layer in enumerate(self.layers):
            for pi in layer.param_indices:
                self.layer_of_param[pi] = li
        self._index_cache: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def layer_index(self, device: torch.device, param_indices: Sequence[int]) -> torch.Tensor:
        """Int64 tensor on ``device``: the layer of each of ``param_indices``. Cached."""
        key = (device, tuple(param_indices))
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) >= _INDEX_CACHE_MAX_ENTRIES:
                self._index_cache.clear()  # patterns of missing grads changed a lot
            cpu = torch.tensor([self.layer_of_param[i] for i in key[1]], dtype=torch.int64)
            index = copy_to_device(cpu, device)
            self._index_cache[key] = index
        return index

    def memory_overhead_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._index_cache.values())


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Unique parameter tensors of all param groups, in order."""
    seen: set[int] = set()
    params: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def build_layer_plan(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_layers: int) -> LayerPlan:
    """Group the optimizer's parameters by owning module; fold the smallest into "other"."""
    params = optimizer_params(optimizer)
    position = {id(p): i for i, p in enumerate(params)}
    groups: dict[str, list[int]] = {}
    module_types: dict[str, str] = {}
    claimed: set[int] = set()
    for module_path, module in unwrap_model(model).named_modules():
        owned: list[int] = []
        for p in module.parameters(recurse=False):
            i = position.get(id(p))
            if i is not None and i not in claimed:  # a shared tensor belongs to its first owner
                claimed.add(i)
                owned.append(i)
        if not owned:
            continue
        name = _unique(sanitize_layer_name(module_path or ROOT), groups)
        groups[name] = owned
        module_types[name] = type(module).__name__
    unowned = [i for i in range(len(params)) if i not in claimed]
    if unowned:
        name = _unique(UNOWNED, groups)
        groups[name] = unowned
        module_types[name] = "Tensor"

    def make(name: str, module_type: str, indices: Sequence[int]) -> Layer:
        return Layer(
            name=name,
            module_type=module_type,
            param_indices=tuple(indices),
            numel=sum(params[i].numel() for i in indices),
            shapes=tuple(tuple(params[i].shape) for i in indices),
        )

    layers = [make(name, module_types[name], idx) for name, idx in groups.items()]
    if len(layers) > max_layers:
        keep_count = max_layers - 1
        by_size = sorted(range(len(layers)), key=lambda li: (-layers[li].numel, li))
        keep = set(by_size[:keep_count])
        folded = [i for li, layer in enumerate(layers) if li not in keep for i in layer.param_indices]
        kept = [layer for li, layer in enumerate(layers) if li in keep]
        other_name = _unique(OTHER, {layer.name: [] for layer in kept})
        layers = [*kept, make(other_name, "folded", sorted(folded))]
    return LayerPlan(params, layers, fsdp1_layout(model, params))


def _unique(name: str, taken: dict[str, list[int]]) -> str:
    if name not in taken:
        return name
    n = 2
    while True:
        suffix = f"_{n}"
        candidate = name[: _LAYER_NAME_MAX_CHARS - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1
