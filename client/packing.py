"""Moving a StepRecord's device scalars to the host without synchronising.

Per device, every tensor the quantities put into the record is concatenated
into ONE flat tensor (already in the pack dtype), copied into a pinned host
buffer with ``non_blocking=True``, and a CUDA event is recorded after the copy
on the current stream. ``ready()`` polls the events (``Event.query`` does not
block); only then are values read. CPU tensors are read directly; other device
types (mps, xpu) fall back to a blocking ``.to("cpu")``.
"""

from __future__ import annotations

from typing import Any

import torch

from healthd_client.quantities.base import Quantity, StepRecord

# (quantity, key, offset, numel, shape) of one value inside a flat part.
_Slot = tuple[Quantity, str, int, int, tuple[int, ...]]


class PackedRecord:
    """A closed StepRecord whose values are on their way to the host."""

    def __init__(self, record: StepRecord) -> None:
        self.record = record
        by_device: dict[torch.device, list[tuple[Quantity, str, torch.Tensor, tuple[int, ...]]]] = {}
        for entry in record.tensors:
            by_device.setdefault(entry[2].device, []).append(entry)
        record.tensors = []  # the flat copies below are all we keep
        self._parts: list[tuple[torch.Tensor, torch.Tensor, Any, list[_Slot]]] = []
        for device, entries in by_device.items():
            slots: list[_Slot] = []
            offset = 0
            for quantity, key, flat, shape in entries:
                slots.append((quantity, key, offset, flat.numel(), shape))
                offset += flat.numel()
            packed = torch.cat([e[2] for e in entries]) if len(entries) > 1 else entries[0][2]
            event = None
            if device.type == "cuda":
                host = torch.empty(packed.numel(), dtype=packed.dtype, pin_memory=True)
                host.copy_(packed, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
            elif device.type == "cpu":
                host = packed.clone() if len(entries) == 1 else packed
            else:
                host = packed.to("cpu")
            # `packed` is kept until the copy is known to be done.
            self._parts.append((packed, host, event, slots))

    def ready(self) -> bool:
        """True when every device->host copy has completed (never blocks)."""
        return all(event is None or event.query() for _, _, event, _ in self._parts)

    def values(self) -> dict[int, tuple[Quantity, dict[str, Any]]]:
        """``{id(quantity): (quantity, {key: value})}``; call only when ``ready()``."""
        out: dict[int, tuple[Quantity, dict[str, Any]]] = {}
        for _, host, _, slots in self._parts:
            flat = host.tolist()
            for quantity, key, offset, numel, shape in slots:
                if len(shape) == 0:
                    value: Any = flat[offset]
                elif len(shape) == 1:
                    value = flat[offset : offset + numel]
                else:
                    value = host[offset : offset + numel].view(shape).tolist()
                out.setdefault(id(quantity), (quantity, {}))[1][key] = value
        for quantity, key, value in self.record.host:
            out.setdefault(id(quantity), (quantity, {}))[1][key] = value
        self._parts = []
        return out
