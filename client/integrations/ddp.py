"""DDP: measure each rank's local gradient inside DistributedDataParallel's communication hook.

What lives here: ``DDPGradientNoise``, a quantity that installs a comm hook
wrapper on a ``DistributedDataParallel`` model. For every gradient bucket the
wrapper adds, on the device and without a host sync,

- the squared norm of ``bucket.buffer()`` before the all-reduce (this rank's
  local gradient: |G_small|²), and
- the squared norm of the all-reduced, averaged bucket (|G_big|²),

then hands the bucket to the real hook. It also times the span from the first
bucket handed over to the last one reduced (``comm_seconds``: mostly waiting
for slower ranks; StragglerRank subtracts it from the step time). healthd turns
the two norms into the gradient noise scale (``healthd.state.noise_scale``).

Composing with your own comm hook: DDP accepts exactly one hook. The wrapper
calls an inner hook (by default ``allreduce_hook`` on the model's process
group, which is what DDP does without a hook). After attach, the model's
``register_comm_hook(state, hook)`` is redirected to replace that inner hook,
so a hook you register later is composed with the measurement rather than
raising "can only be called once". A hook you registered BEFORE attach cannot
be wrapped (DDP offers no way to read it back into its reducer): the quantity
then refuses with one warning and measures nothing; register your hook after
``attach``, or through ``register_comm_hook(model, state, hook)`` here.
Built-in C++ hooks (``_register_builtin_comm_hook``) cannot be composed either.

Timing caveat: ``comm_seconds`` is host time of the hook's future; with NCCL
the future completes when the work is enqueued-and-synchronised by DDP, so on
GPUs it approximates the wait (CUDA events would be exact).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from healthd_client.quantities.base import Quantity, QuantityContext

CommHook = Callable[[Any, Any], "torch.futures.Future[torch.Tensor]"]

_WRAPPER_ATTR = "_healthd_comm_hook"


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=dtype).square()


class _HookWrapper:
    """The comm hook DDP calls: measure, then delegate to ``inner``. Thread-safe accumulation."""

    def __init__(self, inner: CommHook, inner_state: Any) -> None:
        self.inner = inner
        self.inner_state = inner_state
        self._lock = threading.Lock()
        self._local: list[torch.Tensor] = []
        self._reduced: list[torch.Tensor] = []
        self._first_start: float | None = None
        self._last_done: float | None = None
        self.enabled = True

    def __call__(self, state: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
        if not self.enabled:
            return self.inner(self.inner_state, bucket)
        with torch.no_grad():
            local = _sq_norm(bucket.buffer())  # before the inner hook averages it in place
        start = time.perf_counter()
        with self._lock:
            self._local.append(local)
            if self._first_start is None:
                self._first_start = start
        fut = self.inner(self.inner_state, bucket)

        def measure(done: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            reduced = done.value()
            with torch.no_grad():
                sq = _sq_norm(reduced)
            with self._lock:
                self._reduced.append(sq)
                self._last_done = time.perf_counter()
            return reduced

        return fut.then(measure)

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor], float | None]:
        """This step's per-bucket squares and comm span; resets for the next step."""
        with self._lock:
            local, reduced = self._local, self._reduced
            span = (self._last_done - self._first_start
                    if self._first_start is not None and self._last_done is not None else None)
            self._local, self._reduced, self._first_start, self._last_done = [], [], None, None
        return local, reduced, span


def _find_ddp(model: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel | None:
    for _ in range(8):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return None


def install(ddp: torch.nn.parallel.DistributedDataParallel) -> _HookWrapper:
    """Register the measuring wrapper on ``ddp`` (idempotent); raises ``RuntimeError`` if DDP has a hook already."""
    existing = getattr(ddp, _WRAPPER_ATTR, None)
    if isinstance(existing, _HookWrapper):
        return existing
    if getattr(ddp, "_comm_hooks", None):
        raise RuntimeError(
            "healthd: this DDP model already has a communication hook, which DDP cannot hand back for wrapping; "
            "the local gradient norm and the gradient noise scale are not measured. Register your hook after "
            "healthd_client.attach() (it is then composed with healthd's), or with "
            "healthd_client.integrations.ddp.register_comm_hook(model, state, hook)."
        )
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    wrapper = _HookWrapper(allreduce_hook, ddp.process_group)

    def healthd_comm_hook(state, bucket):
        # No annotations on purpose: DDP checks them and only accepts the exact GradBucket/Future types.
        return wrapper(state, bucket)

    ddp.register_comm_hook(None, healthd_comm_hook)
    setattr(ddp, _WRAPPER_ATTR, wrapper)

    def register_comm_hook(state: object, hook: Callable[..., Any]) -> None:
        # Compose: the user's hook becomes the inner hook; measurement stays around it.
        wrapper.inner, wrapper.inner_state = hook, state

    def refuse_builtin(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("healthd: a built-in C++ comm hook cannot be composed with healthd's measuring hook; "
                           "register the equivalent Python hook (torch.distributed.algorithms.ddp_comm_hooks) "
                           "with model.register_comm_hook instead")

    # Replacing a method on this one DDP instance: torch's stubs declare methods, which mypy forbids assigning.
    ddp.register_comm_hook = register_comm_hook  # type: ignore[method-assign]
    ddp._register_builtin_comm_hook = refuse_builtin  # type: ignore[method-assign]
    return wrapper


def register_comm_hook(model: torch.nn.Module, state: object, hook: Callable[..., Any]) -> None:
    """Register ``hook`` on a DDP ``model`` so that healthd's measurement wraps it, before or after attach."""
    ddp = _find_ddp(model)
    if ddp is None:
        raise ValueError("register_comm_hook needs a DistributedDataParallel model")
    wrapper = install(ddp)
    wrapper.inner, wrapper.inner_state = hook, state


# Why a sharded model (FSDP2 ``fully_shard``, HSDP) gets no noise scale: sent in every heartbeat, so
# MonitoringDegraded tells on-call that LargeBatchGeneralization's noise-scale branch is blind on this job.
SHARDED_REASON = (
    "sharded model (FSDP/HSDP): the gradient noise scale needs each rank's own gradient before the "
    "reduce-scatter, which FSDP hands to no supported hook; the sharded .grad is already averaged over ranks"
)
# FSDP1 does offer one (``FullyShardedDataParallel.register_comm_hook``: the local flat gradient, before the
# reduce-scatter); healthd does not install it yet, and says so rather than give FSDP2's reason.
FSDP1_REASON = (
    "FSDP1: the gradient noise scale needs each rank's gradient before the reduce-scatter; healthd does not "
    "install FSDP1's comm hook (register_comm_hook) for it yet, and the sharded gradient is already averaged"
)


class DDPGradientNoise(Quantity):
    """Local and all-reduced gradient norms and all-reduce wait, from DDP's comm hook.

    Writes ``grad_norm_local``, ``grad_norm_allreduced`` and ``comm_seconds``.
    Does nothing (and costs nothing) when the model is not wrapped in DDP. A sharded model (FSDP2, HSDP,
    FSDP1) is the exception that is said, not silent: the data-parallel job whose noise scale
    ``LargeBatchGeneralization`` would want is there, but its local gradients are not. FSDP2 averages each
    rank's unsharded gradient into its shard inside its reduce-scatter; the only way in before that is
    ``FSDPModule.set_custom_reduce_scatter``, which replaces the collective itself (and a custom one the user
    set), and receives an input FSDP may already have pre-divided by a factor it does not pass on. Measured
    from the sharded ``.grad`` instead, every rank would see the same averaged gradient: no small-batch norm.
    So the quantity degrades with ``SHARDED_REASON`` (MonitoringDegraded names it) rather than guess; under
    FSDP1, whose public comm hook would give the local gradient, with ``FSDP1_REASON`` (not built yet).
    """

    name = "ddp_gradient_noise"

    def __init__(self, every_steps: int = 1) -> None:
        super().__init__(every_steps=every_steps)
        self._wrapper: _HookWrapper | None = None

    def on_attach(self, ctx: QuantityContext) -> None:
        ddp = _find_ddp(ctx.model)
        if ddp is None:
            self.every_steps = 0
            layout = ctx.plan.layout
            if layout is not None:  # sharded over ranks: data parallel, but no local gradient
                ctx.degrade(self, FSDP1_REASON if layout.flat else SHARDED_REASON)
            return
        try:
            self._wrapper = install(ddp)
        except RuntimeError as exc:
            self.every_steps = 0
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)

    def before_step(self, ctx: QuantityContext) -> None:
        if self._wrapper is None or ctx.record is None:
            return
        local, reduced, span = self._wrapper.take()
        if not local or len(local) != len(reduced):
            return  # no sync this step (no_sync accumulation), or an incomplete step
        ctx.record.put(self, "local_sq", torch.stack(local).sum())
        ctx.record.put(self, "reduced_sq", torch.stack(reduced).sum())
        if span is not None:
            ctx.record.put(self, "comm_seconds", max(0.0, span))

    def on_step_end(self, ctx: QuantityContext, record: Any) -> None:
        if self._wrapper is not None:
            self._wrapper.take()  # a step the optimizer skipped (AMP) must not leak into the next one

    def write(self, report: dict[str, Any], values: Mapping[str, Any]) -> None:
        if "local_sq" in values:
            report["grad_norm_local"] = math.sqrt(values["local_sq"]) if values["local_sq"] >= 0 else math.nan
            report["grad_norm_allreduced"] = (math.sqrt(values["reduced_sq"]) if values["reduced_sq"] >= 0
                                              else math.nan)
        if "comm_seconds" in values:
            report["comm_seconds"] = float(values["comm_seconds"])

    def close(self) -> None:
        if self._wrapper is not None:
            self._wrapper.enabled = False  # DDP keeps the hook; it now only delegates
