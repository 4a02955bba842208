"""The Quantity plugin interface: how a measurement joins a step report.

What lives here: ``Quantity`` (the base class), ``QuantityContext`` (what a
quantity may read: model, optimizer, layer plan, config; and ``emit`` for reports
of its own) and ``StepRecord`` (one step's measurements in flight). What does
not: the measurements themselves (one file each, next to this one) and the
scheduling (``healthd_client.monitor``).

Life of a step, on the training thread::

    optimizer.step()
      step pre-hook   -> open StepRecord(step)     -> q.before_step(ctx)   [due quantities]
      ... the optimizer updates the parameters ...
      step post-hook                               -> q.after_step(ctx)
    monitor.step(loss=..., batch_size=...)         -> q.on_step_end(ctx, record)
      the record's device tensors are packed into ONE flat tensor per device and
      copied to pinned host memory with ``non_blocking=True`` + a CUDA event;
    a later monitor.step (or close) finds the event done, unpacks, and calls
      q.write(report, values)  for each quantity that put something, then hands
      the report dict to the sender thread.

Rules for a quantity (they are what keeps the step free of host syncs):

- Put values with ``ctx.record.put(self, key, value)`` (or ``record.put`` in
  ``on_step_end``). A ``torch.Tensor`` (any device, any shape, any real dtype)
  stays on its device until packing; ``write`` later receives it under ``key``
  as what ``tensor.double().tolist()`` would give (a float for a 0-d tensor, a
  list for 1-d). Anything else is a host value and is passed through as is.
- Never call ``.item()``, ``.cpu()``, ``.tolist()``, ``float(t)``, ``bool(t)`` or
  ``if t:`` on a device tensor, and never build a device tensor from Python data
  in a hook (``torch.tensor(..., device="cuda")`` synchronises): precompute at
  attach, or use ``healthd_client.layers.copy_to_device``.
- ``every_steps``: the hooks run at steps where ``step % every_steps == 0``
  (0 = never, for attach-only quantities). Hooks of your own (forward hooks,
  comm hooks) are yours to register in ``on_attach`` and remove in ``close``.
- ``write(report, values)`` edits the StepReport dict in place (plain
  JSON-able values; field names from ``healthd.wire.schema.StepReport``). Use
  ``layer_stats(report, name)`` and ``nonfinite(report)`` for the nested parts.
- An exception in any method disables this quantity with one warning; training
  goes on (``attach(strict=True)`` re-raises instead, for tests).
- Reports of another kind (a GpuReport from a sampler thread) go through
  ``ctx.emit(report_dict)``, which fills job/rank/time and never blocks.

Example: a cheap parameter checksum every 50 steps, for the RankDesync rule
(single-device model for brevity; see ``reduce.group_by_device`` otherwise)::

    class ParamFingerprint(Quantity):
        name = "param_fingerprint"

        def after_step(self, ctx):
            params = [p.detach() for p in ctx.plan.params]
            ctx.record.put(self, "fp", torch.stack(torch._foreach_norm(params)).double().sum())

        def write(self, report, values):
            report["param_fingerprint"] = values["fp"]  # a StepReport field

    attach(model, optimizer, job="j", extra_quantities=[ParamFingerprint(every_steps=50)])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from healthd_client.config import MonitorConfig
    from healthd_client.identity import Identity
    from healthd_client.layers import LayerPlan


def inspection_due(next_step: int, every_steps: int, first_steps: int) -> bool:
    """Whether the forward/loss inspections sample step ``next_step``: each of the first
    ``first_steps`` steps, then every ``every_steps``-th."""
    return next_step < first_steps or (next_step + 1) % every_steps == 0


def pack_dtype(device: torch.device) -> torch.dtype:
    """Dtype of the packed record on ``device``: float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


class StepRecord:
    """One optimizer step's measurements, from the pre-hook until it is sent.

    Host facts the monitor fills in: ``step``, ``training`` (model.training at
    the pre-hook), ``loss`` and ``batch_size`` (as given to ``monitor.step``),
    ``closed_by_user`` (False when the next pre-hook had to close it), ``time``
    (Unix seconds when it was closed).
    """

    __slots__ = ("step", "training", "loss", "batch_size", "closed_by_user", "time", "tensors", "host")

    def __init__(self, step: int, training: bool | None) -> None:
        self.step = step
        self.training = training
        self.loss: Any = None
        self.batch_size: int | None = None
        self.closed_by_user = False
        self.time = 0.0
        # (quantity, key, flat tensor in the pack dtype, original shape)
        self.tensors: list[tuple[Quantity, str, torch.Tensor, tuple[int, ...]]] = []
        self.host: list[tuple[Quantity, str, Any]] = []

    def put(self, quantity: Quantity, key: str, value: Any) -> None:
        """Contribute ``value`` under ``key`` (see the module docstring)."""
        if isinstance(value, torch.Tensor):
            t = value.detach()
            self.tensors.append((quantity, key, t.to(pack_dtype(t.device)).reshape(-1), tuple(t.shape)))
        else:
            self.host.append((quantity, key, value))


class QuantityContext:
    """What quantities see: the job's objects and the step in flight.

    ``record`` is the open StepRecord inside the step hooks (None elsewhere);
    ``attach_report`` is the AttachReport dict being built during ``on_attach``
    (quantities may add fields, e.g. ``static_findings``).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: LayerPlan,
        config: MonitorConfig,
        identity: Identity,
        job: str,
        enqueue: Callable[[dict[str, Any]], None],
        stream: str | None = None,
        degrade: Callable[[Quantity, str], None] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.plan = plan
        self.config = config
        self.identity = identity
        self.job = job
        self.stream = stream
        self.record: StepRecord | None = None
        self.attach_report: dict[str, Any] = {}
        # True once the optimizer step was seen running inside a torch.compile'd function: the
        # forward and the loss of such a step run inside graphs, where no forward hook or
        # TorchFunctionMode of ours sees them.
        self.compiled_step = False
        self._enqueue = enqueue
        self._degrade = degrade

    @property
    def step(self) -> int | None:
        return None if self.record is None else self.record.step

    def degrade(self, quantity: Quantity, reason: str) -> None:
        """``quantity`` cannot measure in this job (a compiled model hides what it reads): it stops,
        and every heartbeat says so with ``reason`` (healthd's MonitoringDegraded shows it to on-call)."""
        if self._degrade is not None:
            self._degrade(quantity, reason)

    def emit(self, report: dict[str, Any]) -> None:
        """Send a report of any kind; job, rank, stream and time are filled in when absent."""
        report.setdefault("job", self.job)
        report.setdefault("rank", self.identity.rank)
        if self.stream is not None:
            report.setdefault("stream", self.stream)
        report.setdefault("time", time.time())
        self._enqueue(report)


class Quantity:
    """A measurement. Subclass, override the hooks you need, set ``name``.

    ``every_steps`` (constructor argument) schedules ``before_step``,
    ``after_step`` and ``on_step_end``; ``on_attach``, ``write`` and ``close``
    are always called.
    """

    name = "quantity"
    # One per (job, rank) in a process, not one per monitor (the GPU sampler: the device is the process's).
    # attach() gives it to the first open monitor of the (job, rank) only; when that monitor closes while
    # another of the (job, rank) stays open, it is handed to that one (``hand_over``) instead of closed.
    per_process = False

    def __init__(self, every_steps: int = 1) -> None:
        if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 0:
            raise ValueError(f"every_steps must be an int >= 0, got {every_steps!r}")
        self.every_steps = every_steps

    def due(self, step: int) -> bool:
        """Whether the step hooks run at ``step``."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def on_attach(self, ctx: QuantityContext) -> None:
        """Once, at attach: precompute, register own hooks, add to ``ctx.attach_report``."""

    def before_step(self, ctx: QuantityContext) -> None:
        """In the optimizer's step pre-hook: gradients are final, parameters not yet updated."""

    def after_step(self, ctx: QuantityContext) -> None:
        """In the optimizer's step post-hook: parameters are updated."""

    def on_step_end(self, ctx: QuantityContext, record: StepRecord) -> None:
        """In ``monitor.step`` (or when the next pre-hook closes the record): loss is known."""

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        """Write this quantity's unpacked ``values`` into the StepReport dict ``report``."""

    def close(self) -> None:
        """Remove hooks of your own, free buffers."""

    def hand_over(self, ctx: QuantityContext) -> None:
        """Go on under another monitor's ``ctx`` (``per_process`` quantities only): its monitor closes later
        and calls ``close`` (or hands it over again). Runs before the closing monitor's sender stops."""
        raise NotImplementedError(f"{type(self).__name__} is not per_process")

    def memory_overhead_bytes(self) -> int:
        """Bytes this quantity holds between steps (buffers, index tensors)."""
        return 0


def layer_stats(report: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``layers[name]`` dict of a StepReport dict, created when absent."""
    return report.setdefault("layers", {}).setdefault(name, {})


def nonfinite(report: dict[str, Any]) -> dict[str, Any]:
    """The ``nonfinite`` dict of a StepReport dict, created when absent."""
    return report.setdefault("nonfinite", {})
