"""Auto-attach: a Monitor on the first optimizer that steps, in a script that never calls ``attach``.

Armed by ``healthd_client.bootstrap`` once the process imports torch (HEALTHD_AUTO=1). Only public
PyTorch hooks are used:

- global module forward pre/post hooks (``torch.nn.modules.module.register_module_forward_pre_hook``
  / ``register_module_forward_hook``) note the *root* modules: those called while no other module
  runs (the model, DDP's wrapper, a loss module such as ``nn.CrossEntropyLoss``);
- global optimizer step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``..._post_hook``)
  see the first step: the model is the root module holding most of that optimizer's parameters, and
  ``healthd_client.attach`` runs there with the job, server and token from the environment;
- then the same two global module hooks stay, filtered to the model and, if there is one, the loss
  module (nothing of healthd is put on the user's modules, so checkpoints and deep copies never carry
  it; and the global hook dicts, which dynamo guards on, do not change at attach, so a
  ``torch.compile``d model does not recompile then), and after a few steps the global optimizer hooks go.

Each step is completed with ``monitor.step(loss=, batch_size=)`` from an optimizer step post-hook.
The loss is what ``backward()`` is called on: from the end of the model's forward until its next
forward or the next optimizer step, a ``torch.overrides.TorchFunctionMode`` (``_BackwardRoots``) is
pushed; ``Tensor.backward`` and ``torch.autograd.backward`` pass through ``__torch_function__``
while a mode is active (that is their documented override point), so the mode sees the tensor
whatever computed it: a loss module, ``F.mse_loss``, a plain function, a sum of several losses. Only a
one-element float tensor is taken (``out.backward(grad)`` is not a loss); it is kept detached, on
its device (no host sync). The window is short: the loss computation and the backward call (Python
hooks that run during backward, FSDP's say, pass through the mode too, one Python call per torch
function); the model's own forward never runs under it, so a ``torch.compile``d model starts its
frame with the same mode stack every step (no recompiles). When no ``backward()`` is seen (a loss
inside a compiled training step, ``torch.autograd.grad``) the loss is the last scalar that requires
grad returned by the model (a tensor, ``.loss`` or ``["loss"]``, as Hugging Face models return) or by
a root loss module; otherwise the report carries no loss. Under gradient accumulation it is the last
micro-batch's. With ``torch.amp.GradScaler`` and a loss that is neither a module's nor the model's
output, it is the scaled loss (``scaler.scale(loss)`` is what ``backward()`` is called on). The batch
size is the first dimension of the model's first tensor argument, summed over the forward calls of a
step (gradient accumulation).

``HEALTHD_STOP_ON=NonFiniteValues[,Rule...]`` (``healthd-run --stop-on``) is ``attach(stop_on=...)``:
when healthd answers that one of those alerts fires, the next ``optimizer.step()`` raises
``healthd_client.TrainingStopped`` (from the monitor's pre-hook, before the update, or from the
post-hook that completes the step, as an explicit ``monitor.step()`` would). A name that is not an alert
name is logged and ignored: a typo must not cost the job its monitoring.

One monitor per process: the first optimizer to step. Another optimizer stepping is logged once and
not monitored. An explicit ``attach`` wins: auto-attach leaves an optimizer alone that already has a
monitor, and an explicit ``attach`` on an optimizer auto-attach monitors replaces that monitor
(``healthd_client.attachment.yielding``).

Never harm: an exception here is logged once, every hook of ours is removed, and the job runs as if
healthd were absent.

Why this module is over 400 lines: ``AutoAttach`` is one state machine (find the model from the
first optimizer step, watch the loss between forward and step, hand both to one monitor, remove every
hook on failure or close); split across modules its hooks would share that state through globals.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from healthd_client.alerts import ALERT_NAME, TrainingStopped
from healthd_client.identity import label_safe

logger = logging.getLogger("healthd_client.auto")

# The global optimizer hooks stay this many steps of the monitored optimizer after attaching, to
# notice (and log) a second optimizer stepping in the same loop (a GAN's, an encoder's).
_WATCH_OTHER_OPTIMIZER_STEPS = 3


def default_job(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The job name when HEALTHD_JOB is unset: the script's name, plus the launch's run id if there is one.

    Every rank computes the same name: the script and TORCHELASTIC_RUN_ID / SLURM_JOB_ID are shared.
    """
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    script = Path(argv[0]).stem if argv and argv[0] not in ("", "-c", "-m") else "python"
    run_id = next((environ[n] for n in ("HEALTHD_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")
                   if environ.get(n) and environ[n] != "none"), None)
    name = label_safe(f"{script}-{run_id}" if run_id else script).lstrip("_.:/@+-")
    return name or "python"


def stop_on_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The alert names in HEALTHD_STOP_ON (comma- or space-separated); names that cannot be alerts are
    logged and dropped."""
    environ = os.environ if environ is None else environ
    names = [n for n in environ.get("HEALTHD_STOP_ON", "").replace(",", " ").split() if n]
    bad = [n for n in names if not ALERT_NAME.match(n)]
    if bad:
        logger.warning("healthd: HEALTHD_STOP_ON: %s not alert names (e.g. NonFiniteValues); ignored",
                       ", ".join(repr(n) for n in bad))
    return tuple(dict.fromkeys(n for n in names if n not in bad))


def _nobody() -> None:
    """A dead reference: what ``AutoAttach`` watches before it attaches."""
    return None


def _scalar_loss(value: Any) -> torch.Tensor | None:
    """``value`` if it looks like a training loss (a one-element float tensor that requires grad), or
    its ``.loss`` / ``["loss"]`` if that does (Hugging Face ``ModelOutput``)."""
    if not isinstance(value, torch.Tensor):
        value = value.get("loss") if isinstance(value, Mapping) else getattr(value, "loss", None)
    if isinstance(value, torch.Tensor) and value.requires_grad and value.numel() == 1 and value.is_floating_point():
        return value
    return None


def _batch_size(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() > 0 else None
    return None


def _backward_root(func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The tensor a ``Tensor.backward`` / ``torch.autograd.backward`` call differentiates, if it is one."""
    if func is torch.Tensor.backward:
        root = args[0] if args else None
    elif func is torch.autograd.backward:
        root = args[0] if args else kwargs.get("tensors")
        if isinstance(root, list | tuple) and len(root) == 1:
            root = root[0]
    else:
        return None
    if isinstance(root, torch.Tensor) and root.numel() == 1 and root.is_floating_point():
        return root
    return None


class _BackwardRoots(TorchFunctionMode):
    """Hands ``on_backward`` the loss of each ``backward()`` call made while pushed; passes everything on."""

    def __init__(self, on_backward: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.on_backward = on_backward

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            root = _backward_root(func, args, kwargs)
            if root is not None:
                self.on_backward(root)
        return func(*args, **kwargs)


class AutoAttach:
    """The global hooks and what they learnt. One per process (``install``); tests build their own."""

    def __init__(self, attach: Callable[..., Any] | None = None, config: Any = None) -> None:
        self._attach = attach
        self._config = config
        self._local = threading.local()  # forward depth per thread (DataParallel runs replicas in threads)
        self._roots: weakref.WeakKeyDictionary[torch.nn.Module, None] = weakref.WeakKeyDictionary()
        self._loss_roots: weakref.WeakKeyDictionary[torch.nn.Module, None] = weakref.WeakKeyDictionary()
        self._root_batch: weakref.WeakKeyDictionary[torch.nn.Module, int | None] = weakref.WeakKeyDictionary()
        self._module_handles: list[RemovableHandle] = []
        self._optimizer_handles: list[RemovableHandle] = []
        # The model and the loss module (weak: a model the job drops is not kept alive). Compared by identity
        # in hooks that run on every module call of the process: no weak-dictionary lookup there.
        self._model_ref: Callable[[], torch.nn.Module | None] = _nobody
        self._loss_ref: Callable[[], torch.nn.Module | None] = _nobody
        self._complete_handle: RemovableHandle | None = None  # the monitored optimizer's step post-hook
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        self._others_logged = False
        self._watch_steps = 0
        self.monitor: Any = None
        self.done = False  # decided: attached, yielded to an explicit attach, or failed
        self.failed = False
        self._loss: torch.Tensor | None = None
        self._batch: int | None = None
        self._spy = _BackwardRoots(self._on_backward)
        self._spy_pushed = False
        self._close_handle: RemovableHandle | None = None  # closes the backward window before any step

    # ------------------------------------------------------------------ life cycle

    def install(self) -> None:
        # First of the global step pre-hooks (they run in registration order, before the optimizer's own,
        # where LossInputs pops its mode: ours, pushed after it, must go first). It stays: one call per step.
        self._close_handle = register_optimizer_step_pre_hook(self._close_before_step)
        self._module_handles = [
            register_module_forward_pre_hook(self._forward_pre),
            register_module_forward_hook(self._forward_post, with_kwargs=True, always_call=True),
        ]
        self._optimizer_handles = [
            register_optimizer_step_pre_hook(self._global_step_pre),
            register_optimizer_step_post_hook(self._global_step_post),
        ]

    def remove(self) -> None:
        """Remove every hook of ours (not the monitor's: ``monitor.close()`` does that). Not from inside an
        optimizer step hook: torch loops over those dicts and a dict may not shrink while it is iterated."""
        self._close_window()
        for handle in (*self._module_handles, *self._optimizer_handles):
            handle.remove()
        for one in (self._complete_handle, self._close_handle):
            if one is not None:
                one.remove()
        self._module_handles, self._optimizer_handles = [], []
        self._complete_handle = self._close_handle = None

    def _fail(self, where: str, exc: BaseException) -> None:
        if not self.failed:
            logger.warning("healthd: auto-attach failed in %s and is off for this process: %r", where, exc)
        self.failed = self.done = True
        self._close_window()
        # Module hooks may go at once (torch copies them before calling); the optimizer hooks stay and
        # return at once (see remove()).
        for handle in self._module_handles:
            handle.remove()
        self._module_handles = []

    # ------------------------------------------------------------------ the backward window

    def _open_window(self) -> None:
        """After a root (the model) ran its forward with grad on: what follows is the loss and backward()."""
        if self._spy_pushed or self.failed or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        self._spy.__enter__()
        self._spy_pushed = True

    def _close_window(self) -> None:
        """Before the model's next forward and before any optimizer step: nothing else runs under our mode.
        (Not from inside ``__torch_function__``: the mode is off the stack while it runs.)"""
        if not self._spy_pushed:
            return
        self._spy_pushed = False
        try:
            self._spy.__exit__(None, None, None)
        except Exception as exc:  # another thread's or a user mode pushed on top and already gone
            self._fail("closing the backward window", exc)

    def _on_backward(self, loss: torch.Tensor) -> None:
        if not self.failed:
            self._loss = loss.detach()

    def _close_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._close_window()

    # ------------------------------------------------------------------ global module hooks (until attached)

    # Every module hook of ours returns at once while dynamo traces (torch.compile traces global hooks into
    # the graph of a compiled forward): the compiled frame holds nothing of healthd.

    # After attaching these two run on every module call of the process for a model and a loss module:
    # the common case (another module, window closed) is decided inline by identity, with no further call.

    def _forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self.done:
            if self._spy_pushed and module is self._model_ref():
                self._close_window()  # the model's forward never runs under our mode (nor does a compiled frame start)
        else:
            self._global_forward_pre(module, args)

    def _forward_post(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self.done:
            if module is self._model_ref():
                self._model_forward(module, args, kwargs, output)
            elif module is self._loss_ref():
                self._loss_forward(module, args, output)
        else:
            self._global_forward(module, args, kwargs, output)

    def _global_forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._close_window()
        self._local.depth = depth + 1

    def _global_forward(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        depth = getattr(self._local, "depth", 1) - 1
        self._local.depth = depth
        if depth != 0 or self.done:
            return
        try:
            self._roots[module] = None
            if not torch.is_grad_enabled():
                return
            self._root_batch[module] = _batch_size(args, kwargs)  # for the first step, measured before our hooks
            loss = _scalar_loss(output)
            if loss is not None:
                self._loss_roots[module] = None
                self._loss = loss.detach()
            self._open_window()  # a loss module (a root too) closed it at its start: reopen for backward()
        except Exception as exc:
            self._fail("a module forward hook", exc)

    # ------------------------------------------------------------------ global optimizer hooks

    def _global_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.failed:
            return
        try:
            self._consider(optimizer, before_step=True)
        except Exception as exc:
            self._fail("the optimizer step pre-hook", exc)

    def _global_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.failed:
            return
        try:
            if not self.done:
                # No root module ran before the step: forward and backward run inside step(closure).
                self._consider(optimizer, before_step=False)
            elif self._optimizer is not None and self._optimizer() is optimizer:
                self._watch_steps += 1  # _complete_step removes the global optimizer hooks when it is time
        except Exception as exc:
            self._fail("the optimizer step post-hook", exc)

    def _consider(self, optimizer: torch.optim.Optimizer, before_step: bool) -> None:
        monitored = self._optimizer() if self._optimizer is not None else None
        if self.done:
            if optimizer is not monitored and monitored is not None and not self._others_logged:
                self._others_logged = True
                logger.warning("healthd: auto-attach monitors the first optimizer that stepped (%s); "
                               "this %s is not monitored (call healthd_client.attach for it)",
                               type(monitored).__name__, type(optimizer).__name__)
            return
        from healthd_client.monitor import attached

        existing = attached.get(optimizer)
        if existing is not None and not existing.closed:
            self._settle(None)  # an explicit attach() wins, silently
            return
        model = self._find_model(optimizer)
        if model is None:
            if not before_step:
                raise RuntimeError("no module holding the optimizer's parameters ran a forward pass before its step")
            return
        self._batch = self._root_batch.get(model)
        self._settle(optimizer)
        loss_module = next((m for m in self._loss_roots if m is not model and not any(True for _ in m.parameters())),
                           None)
        from healthd_client.attachment import attach as explicit_attach

        attach = self._attach if self._attach is not None else explicit_attach
        server = os.environ.get("HEALTHD_SERVER")
        if not server:
            raise RuntimeError("HEALTHD_SERVER is not set")
        kwargs: dict[str, Any] = {"job": os.environ.get("HEALTHD_JOB") or default_job(), "server": server}
        if self._config is not None:
            kwargs["config"] = self._config
        stop_on = stop_on_from_env()
        if stop_on:
            kwargs["stop_on"] = stop_on
        monitor = attach(model, optimizer, **kwargs)
        from healthd_client.attachment import yielding

        yielding.add(monitor)
        self.monitor = monitor
        # The global forward hooks look for the model and the loss module, not hooks on them: a hook
        # on a module is pickled with it (torch.save(model) would carry healthd into the checkpoint, and a
        # weights-only load would refuse it) and copied by deepcopy. The price: every module call in the
        # process goes through one more Python call (auto-attach is opt-in; explicit attach has none).
        self._model_ref = weakref.ref(model)
        if loss_module is not None:
            self._loss_ref = weakref.ref(loss_module)
        # After the monitor's own post-hook (hooks run in registration order): the step's record is open.
        self._complete_handle = optimizer.register_step_post_hook(self._complete_step)
        if not before_step:
            self._loss = self._batch = None  # this step is not measured: the monitor starts at the next one
        logger.info("healthd: auto-attached to %s (%s) for job %r; loss from %s", type(model).__name__,
                    type(optimizer).__name__, kwargs["job"],
                    "the model's output" if loss_module is None else type(loss_module).__name__)

    def _settle(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.done = True
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        if optimizer is None:  # nothing to watch: the module hooks go (a compiled model recompiles once)
            for handle in self._module_handles:
                handle.remove()
            self._module_handles = []
        self._roots, self._root_batch = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
        if optimizer is None:
            self._loss = None
        # With no monitored optimizer (an explicit attach won) the global optimizer hooks stay and return at
        # once: removing them from inside torch's loop over them would break that loop.

    def _find_model(self, optimizer: torch.optim.Optimizer) -> torch.nn.Module | None:
        wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
        best, best_count = None, 0
        for module in list(self._roots):
            count = sum(1 for p in module.parameters() if id(p) in wanted)
            if count > best_count:
                best, best_count = module, count
        if best is not None and best_count < len(wanted):
            logger.warning("healthd: auto-attach watches %s, which holds %d of the optimizer's %d parameters",
                           type(best).__name__, best_count, len(wanted))
        return best

    # ------------------------------------------------------------------ per-step hooks (after attaching)

    def _model_forward(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        try:
            if self.failed or not torch.is_grad_enabled():
                return  # evaluation
            loss = _scalar_loss(output)
            if loss is not None:
                self._loss = loss.detach()
            batch = _batch_size(args, kwargs)
            if batch is not None:
                self._batch = batch + (self._batch or 0)
            self._open_window()
        except Exception as exc:
            self._fail("the model's forward hook", exc)

    def _loss_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        try:
            if self.failed:
                return
            loss = _scalar_loss(output)
            if loss is not None:
                self._loss = loss.detach()
        except Exception as exc:
            self._fail("the loss module's forward hook", exc)

    def _complete_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.failed:
            return
        try:
            # Torch is looping over this optimizer's own post-hooks, not yet over the global ones.
            if self._watch_steps >= _WATCH_OTHER_OPTIMIZER_STEPS and self._optimizer_handles:
                for handle in self._optimizer_handles:
                    handle.remove()
                self._optimizer_handles = []
            monitor = self.monitor
            loss, batch, self._loss, self._batch = self._loss, self._batch, None, None
            if monitor is None or monitor.closed:  # closed, or replaced by an explicit attach()
                self._close_window()
                for handle in self._module_handles:
                    handle.remove()
                self._module_handles = []
                return
            monitor.step(loss=loss, batch_size=batch)
        except TrainingStopped:
            raise  # HEALTHD_STOP_ON: the job asked for this; it leaves optimizer.step() as from monitor.step()
        except Exception as exc:
            self._fail("the optimizer step post-hook", exc)


_installed: AutoAttach | None = None


def install() -> AutoAttach:
    """Install the process's auto-attach hooks (idempotent); called by ``healthd_client.bootstrap``."""
    global _installed
    if _installed is None:
        _installed = AutoAttach()
        _installed.install()
    return _installed
