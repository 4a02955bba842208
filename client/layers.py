"""Grouping the optimizer's parameter tensors into named layers.

A layer is the parameter tensors directly owned by one module, named by the
module's path ("encoder.layers.1.attn"; the root module's own parameters are
"root"; parameters the optimizer holds that no module owns are "unowned").
There are at most ``max_layers`` layers: beyond that the smallest (by parameter
count) are folded into one layer named "other", so the number of label values
healthd sees stays bounded.

Under peft the module paths are long and say little at a glance
(``base_model.model.transformer.h.0.attn.c_attn.lora_A.default``): ``readable_layer_name``
names a layer after the module it adapts instead (``h.0.attn.c_attn:lora``; the frozen
original it wraps is ``h.0.attn.c_attn``), and a module's LoRA A and B matrices are one
layer. One layer per adapted module groups the adapters the way a person reads them, and
is also the unit whose numbers mean something: B starts at zero, so B alone has no update
ratio and A alone gets no gradient on the first step.

Also here: the per-device index tensors (parameter -> layer) the quantities use
to scatter-add per-tensor values into per-layer sums without a host sync.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
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


# peft's adapter containers, under the module they adapt: LoRA's A/B (Linear/Conv: ModuleDicts keyed by the
# adapter's name; Embedding: ParameterDicts), DoRA's magnitude; the frozen original is ``base_layer``.
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_DEFAULT_ADAPTER = "default"


def peft_prefixes(model: torch.nn.Module) -> tuple[str, ...] | None:
    """The module-path prefixes a peft wrapper adds, longest first (``base_model.model.`` plus the wrapped
    Hugging Face model's ``base_model_prefix``, e.g. ``transformer.``; then ``base_model.model.`` alone, for
    ``lm_head`` and other modules outside the body), or None when ``model`` is no peft model.

    Only peft models are renamed: the layer names of every other model stay the module paths they were,
    so existing dashboards and alert routes keep matching."""
    if type(model).__module__.split(".")[0] != "peft" and not hasattr(model, "peft_config"):
        return None
    tuner = getattr(model, "base_model", None)
    inner = getattr(tuner, "model", None)
    if not isinstance(inner, torch.nn.Module):
        return None
    body = getattr(inner, "base_model_prefix", None)
    if isinstance(body, str) and body and isinstance(getattr(inner, body, None), torch.nn.Module):
        return (f"base_model.model.{body}.", "base_model.model.")
    return ("base_model.model.",)


def readable_layer_name(path: str, prefixes: Sequence[str]) -> str:
    """A peft module path as a person reads it: the first of ``prefixes`` it starts with dropped, adapters
    named after the module they adapt.

    ``base_model.model.transformer.h.0.attn.c_attn.lora_A.default`` -> ``h.0.attn.c_attn:lora`` (and
    ``lora_B.default`` too: one layer per adapted module); an adapter not named "default" keeps its name
    (``h.0.attn.c_attn:lora.math``); ``...c_attn.base_layer`` (the frozen original) -> ``h.0.attn.c_attn``;
    ``modules_to_save.default`` (the trained copy of a module) -> the module's name and its frozen
    ``original_module`` -> ``name:original``. Other paths only lose the prefix."""
    for prefix in prefixes:
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
        if prefix.startswith(path + "."):
            path = ""  # the wrappers themselves (their own parameters, rare)
            break
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        if i == 0:
            continue
        module = ".".join(parts[:i])
        adapter = parts[i + 1] if i + 1 < len(parts) else _DEFAULT_ADAPTER
        if part in _ADAPTER_PARTS:
            return f"{module}:lora" if adapter == _DEFAULT_ADAPTER else f"{module}:lora.{adapter}"
        if part == "base_layer" and i == len(parts) - 1:
            return module
        if part == "modules_to_save" and i + 1 == len(parts) - 1:
            return module if adapter == _DEFAULT_ADAPTER else f"{module}.{adapter}"
        if part == "original_module" and i == len(parts) - 1:
            return f"{module}:original"
    return path or ROOT


def layer_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(layer name, module)`` for each module of the user's model, unsanitized: the module path, or
    under peft ``readable_layer_name``'s (several modules may share one: a LoRA's A and B)."""
    model = unwrap_model(model)
    prefixes = peft_prefixes(model)
    for path, module in model.named_modules():
        yield (readable_layer_name(path, prefixes) if prefixes is not None else path or ROOT), module


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
    for readable, module in layer_names(model):
        owned: list[int] = []
        for p in module.parameters(recurse=False):
            i = position.get(id(p))
            if i is not None and i not in claimed:  # a shared tensor belongs to its first owner
                claimed.add(i)
                owned.append(i)
        if not owned:
            continue
        name = sanitize_layer_name(readable)
        if ":lora" in name and name in groups:  # a LoRA's B after its A: one layer per adapted module
            groups[name].extend(owned)
            continue
        name = _unique(name, groups)
        groups[name] = owned
        module_types[name] = "LoRA" if ":lora" in name else type(module).__name__
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
