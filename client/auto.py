"""Auto-attach: a Monitor per optimizer that steps, in a script that never calls ``attach``.

Armed by ``healthd_client.bootstrap`` once the process imports torch (HEALTHD_AUTO=1). Only public
PyTorch hooks are used:

- global module forward pre/post hooks (``torch.nn.modules.module.register_module_forward_pre_hook``
  / ``register_module_forward_hook``) note the *root* modules: those called while no other module
  runs (the model, DDP's wrapper, a loss module such as ``nn.CrossEntropyLoss``);
- global optimizer step hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``..._post_hook``)
  see each optimizer's first step: its model is the root module holding most of that optimizer's
  parameters, and ``healthd_client.attach`` runs there with the job, server and token from the environment;
- then the same two global module hooks stay, filtered to the watched models and loss modules (nothing of
  healthd is put on the user's modules, so checkpoints and deep copies never carry it; and the global hook
  dicts, which dynamo guards on, do not change at attach, so a ``torch.compile``d model does not
  recompile then). Discovery (the global optimizer hooks, and noting every root module) ends once
  ``_DISCOVERY_STEPS`` optimizer steps passed with no optimizer stepping for the first time.

Several optimizers (a GAN's two Adams, a WGAN critic stepping 5 times per generator step, actor and
critic) are one monitor and one stream each, with their own model, loss and step count. Streams: the first
optimizer to step reports on the unnamed stream, as a single-optimizer job always does, unless another
model already trains then (a root other than its model ran a forward with grad on and holds trainable
parameters the optimizer does not: the tutorial GAN's generator before the discriminator's first step);
then, and for every later optimizer, the stream is named after the model's class, snake_cased
(``Generator`` -> ``generator``), or ``optimizer_<n>`` (n: the order optimizers first stepped in) when the
class is torch's own (``Sequential``) or that name is taken: the same on every rank and every run. At most
``MAX_STREAMS`` (healthd's default ``max_streams_per_job``); past that, and for a second optimizer of an
already watched model (Muon plus AdamW on one model), an optimizer is logged once and not monitored.

Each step is completed with ``monitor.step(loss=, batch_size=)`` from an optimizer step post-hook.
The loss is what ``backward()`` is called on: from the end of a watched model's forward until a watched
model's next forward or the next optimizer step, a ``torch.overrides.TorchFunctionMode`` (``_BackwardRoots``)
is pushed; ``Tensor.backward`` and ``torch.autograd.backward`` pass through ``__torch_function__``
while a mode is active (that is their documented override point), so the mode sees the tensor
whatever computed it: a loss module, ``F.mse_loss``, a plain function, a sum of several losses. Only a
one-element float tensor is taken (``out.backward(grad)`` is not a loss); it is kept detached, on
its device (no host sync). The window is short: the loss computation and the backward call (Python
hooks that run during backward, FSDP's say, pass through the mode too, one Python call per torch
function); a model's own forward never runs under it, so a ``torch.compile``d model starts its
frame with the same mode stack every step (no recompiles). When no ``backward()`` is seen (a loss
inside a compiled training step, ``torch.autograd.grad``) the loss is the last scalar that requires
grad returned by a model (a tensor, ``.loss`` or ``["loss"]``, as Hugging Face models return) or by
a root loss module; otherwise the report carries no loss. Which step a loss belongs to: an optimizer's
step reports the last loss captured since *that optimizer's* previous step, or none if there was none.
In an alternating GAN each side gets its own backward's loss; when several optimizers step after one
``backward()`` (a shared actor-critic loss) each reports that loss, since it made the gradients each
applies; under gradient accumulation it is the last micro-batch's. Backward calls interleaved across
optimizers (two backwards, then two steps) give both steps the last one: auto-attach cannot tell which
parameters a backward reached without walking the graph; attach explicitly for such loops. The batch
size is the first dimension of the model's first tensor argument, summed over its model's forward calls
since the optimizer's previous step (gradient accumulation; a discriminator fed real and fake batches
counts both).

Under ``torch.amp.GradScaler`` the root of ``scaler.scale(loss).backward()`` is ``loss * scale``
(65536 at first). When the step is driven by ``scaler.step(optimizer)`` the loss is divided by
``scaler.scale(1)``, on its device: the true loss, with no host sync (``get_scale()`` would sync). The
scaler is found as the ``self`` of the running ``GradScaler.step`` among the step hook's callers
(``_stepping_scaler`` says why frames). A loss from a model's or loss module's output is not scaled and
is left as it is.

Named streams (several models training) report ``loss_kind="adversarial"`` unless
``HEALTHD_LOSS_KIND=minimized`` (``several_models_loss_kind`` says why).

``HEALTHD_STOP_ON=NonFiniteValues[,Rule...]`` (``healthd-run --stop-on``) is ``attach(stop_on=...)``:
when healthd answers that one of those alerts fires, the next ``optimizer.step()`` raises
``healthd_client.TrainingStopped`` (from the monitor's pre-hook, before the update, or from the
post-hook that completes the step, as an explicit ``monitor.step()`` would). A name that is not an alert
name is logged and ignored: a typo must not cost the job its monitoring.

Explicit wins: when the script attaches healthd itself (``attach`` or the Lightning / Hugging Face
callback: an open monitor auto-attach did not make) by an optimizer's first step, auto-attach monitors no
further optimizer (the script chose what to monitor; with one optimizer this is what happened before
streams). An explicit ``attach`` on an optimizer auto-attach monitors replaces that monitor
(``healthd_client.attachment.yielding``).

Step 0's forward samples (activations, inputs, loss inputs) are missing under auto-attach; they come at
the next sampled steps (1 and 2 with the default ``inspect_first_steps=3``). The monitor, and the forward
tap it arms for a sampled step, exist only from the first ``optimizer.step()``: that is where an optimizer
names its model, after step 0's forward ran. Capturing step 0 would take one of: the model before the
first step (PyTorch has no public hook at optimizer construction, and the first root module to run with
grad on may be a loss module or a frozen teacher, not the model); keeping step 0's activations alive
until the step (memory the size of the activations); or measuring them in the discovery hooks (a second
definition of the ``Activations`` / ``Inputs`` quantities). None is free, so step 0 is left unsampled.

Never harm: an exception here is logged once, every hook of ours is removed, and the job runs as if
healthd were absent.

Why this module is over 400 lines: ``AutoAttach`` is one state machine (find each model from its
optimizer's first step, watch the loss between forward and step, hand both to that optimizer's monitor,
remove every hook on failure or close); split across modules its hooks would share that state through
globals.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from healthd_client.alerts import ALERT_NAME, TrainingStopped
from healthd_client.identity import label_safe

logger = logging.getLogger("healthd_client.auto")

# The global optimizer hooks (and the search for root modules) stay until this many optimizer steps
# passed with no optimizer stepping for the first time: long enough for a WGAN's generator to step after
# its critic's first 5 (or 25, a common warm-up) steps; after that, one more optimizer is not seen.
_DISCOVERY_STEPS = 32
# healthd refuses a job's 9th stream (Settings.limits.max_streams_per_job, 8 by default).
MAX_STREAMS = 8
# Caller frames searched for a running GradScaler.step: step hook <- optimizer.step wrapper <- GradScaler
# internals <- GradScaler.step (4 in torch 2.13; margin for a wrapped optimizer).
_SCALER_FRAMES = 8


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


def several_models_loss_kind(environ: Mapping[str, str] | None = None) -> str:
    """The ``loss_kind`` of a stream auto-attach names because several models train in the process.

    Two optimizers stepping two models in one process are, in the programs people run, a GAN's players,
    an actor and a critic, or a WGAN critic: each loss is judged against a moving opponent or target and
    does not simply go down, so the "should go down" loss rules (LossPlateau, LossDiverging,
    LossOscillating, InitialLossUnexpected) would page for nothing there (``attach(loss_kind="adversarial")``
    is what an explicit attach of those says). So such streams are ``"adversarial"`` unless
    ``HEALTHD_LOSS_KIND=minimized`` says the models' losses are each minimized (independent models trained
    side by side); a single-optimizer job is never affected."""
    from healthd_client.attachment import LOSS_KINDS

    value = (os.environ if environ is None else environ).get("HEALTHD_LOSS_KIND", "").strip().lower()
    if value and value not in LOSS_KINDS:
        logger.warning("healthd: HEALTHD_LOSS_KIND=%r is not one of %s; using 'adversarial'", value,
                       ", ".join(LOSS_KINDS))
        value = ""
    return value or "adversarial"


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


class _Watch:
    """One monitored optimizer: its model, its monitor, and what its next step reports."""

    __slots__ = ("batch", "handle", "loss_seen", "model", "monitor", "optimizer", "stream")

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, stream: str | None) -> None:
        self.optimizer = weakref.ref(optimizer)
        self.model = weakref.ref(model)
        self.stream = stream
        self.monitor: Any = None
        self.handle: RemovableHandle | None = None  # its step post-hook, which completes the step
        self.loss_seen = 0  # AutoAttach._loss_seq at this optimizer's previous step
        self.batch: int | None = None  # examples its model saw since this optimizer's previous step


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
        self._watches: list[_Watch] = []  # in the order their optimizers first stepped
        # The watched models and loss modules by id, for the hooks that run on every module call of the
        # process: one dictionary lookup there, then an identity check against the weak reference.
        self._by_model: dict[int, _Watch] = {}
        self._loss_modules: dict[int, weakref.ref[torch.nn.Module]] = {}
        self._decided: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()  # monitored or left alone
        self._discovering = True  # global root tracking and global optimizer hooks still on
        self._quiet_steps = 0  # optimizer steps since the last optimizer seen for the first time
        self._logged: set[str] = set()
        self.done = False  # the first optimizer is decided: attached, yielded to an explicit attach, or failed
        self.failed = False
        self._loss: torch.Tensor | None = None
        self._loss_seq = 0  # counts the losses captured; a step reports one captured after its previous step
        self._loss_from_backward = False
        self._spy = _BackwardRoots(self._on_backward)
        self._spy_pushed = False
        self._close_handle: RemovableHandle | None = None  # closes the backward window before any step

    @property
    def monitor(self) -> Any:
        """The first optimizer's monitor (the unnamed stream), or None."""
        return self._watches[0].monitor if self._watches else None

    @property
    def monitors(self) -> dict[str | None, Any]:
        """Every auto-attached monitor by stream (None: the unnamed stream), in the order their optimizers stepped."""
        return {w.stream: w.monitor for w in self._watches}

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
        """Remove every hook of ours (not the monitors': ``monitor.close()`` does that). Not from inside an
        optimizer step hook: torch loops over those dicts and a dict may not shrink while it is iterated."""
        self._close_window()
        handles = [*self._module_handles, *self._optimizer_handles, *(w.handle for w in self._watches),
                   self._close_handle]
        for handle in handles:
            if handle is not None:
                handle.remove()
        self._module_handles, self._optimizer_handles, self._close_handle = [], [], None
        for watch in self._watches:
            watch.handle = None

    def close(self) -> None:
        """``remove()``, then close every auto-attached monitor."""
        self.remove()
        for watch in self._watches:
            if watch.monitor is not None:
                watch.monitor.close()

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(message, *args)

    def _fail(self, where: str, exc: BaseException) -> None:
        if not self.failed:
            logger.warning("healthd: auto-attach failed in %s and is off for this process: %r", where, exc)
        self.failed = self.done = True
        self._discovering = False
        self._close_window()
        # Module hooks may go at once (torch copies them before calling); the optimizer hooks stay and
        # return at once (see remove()).
        self._drop_module_hooks()

    def _drop_module_hooks(self) -> None:
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
        """Before a watched model's next forward and before any optimizer step: nothing else runs under our
        mode. (Not from inside ``__torch_function__``: the mode is off the stack while it runs.)"""
        if not self._spy_pushed:
            return
        self._spy_pushed = False
        try:
            self._spy.__exit__(None, None, None)
        except Exception as exc:  # another thread's or a user mode pushed on top and already gone
            self._fail("closing the backward window", exc)

    def _take_loss(self, loss: torch.Tensor, from_backward: bool) -> None:
        self._loss = loss.detach()
        self._loss_seq += 1
        self._loss_from_backward = from_backward

    def _on_backward(self, loss: torch.Tensor) -> None:
        if not self.failed:
            self._take_loss(loss, from_backward=True)

    def _close_before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._close_window()

    # ------------------------------------------------------------------ global module hooks

    # Every module hook of ours returns at once while dynamo traces (torch.compile traces global hooks into
    # the graph of a compiled forward): the compiled frame holds nothing of healthd.

    # Once discovery is over these two run on every module call of the process for the watched models and
    # loss modules: the common case (another module, window closed) is one dictionary lookup, no further call.

    def _forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self._discovering:
            self._global_forward_pre(module, args)
        elif self._spy_pushed and id(module) in self._by_model:
            self._close_window()  # a model's forward never runs under our mode (nor does a compiled frame start)

    def _forward_post(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        watch = self._by_model.get(id(module))
        if watch is not None and watch.model() is module:
            self._model_forward(watch, args, kwargs, output)
        elif id(module) in self._loss_modules and self._loss_modules[id(module)]() is module:
            self._loss_forward(module, args, output)
        if self._discovering:
            self._global_forward(module, args, kwargs, output)

    def _global_forward_pre(self, module: torch.nn.Module, args: Any) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._close_window()
        self._local.depth = depth + 1

    def _global_forward(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        depth = getattr(self._local, "depth", 1) - 1
        self._local.depth = depth
        if depth != 0 or self.failed:
            return
        try:
            self._roots[module] = None
            if not torch.is_grad_enabled():
                return
            self._root_batch[module] = _batch_size(args, kwargs)  # for the first step, measured before our hooks
            loss = _scalar_loss(output)
            if loss is not None:
                self._loss_roots[module] = None
                if id(module) not in self._by_model:  # a watched model's loss is taken in _model_forward
                    self._take_loss(loss, from_backward=False)
            self._open_window()  # a loss module (a root too) closed it at its start: reopen for backward()
        except Exception as exc:
            self._fail("a module forward hook", exc)

    # ------------------------------------------------------------------ global optimizer hooks (discovery)

    def _global_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.failed or not self._discovering:
            return
        try:
            self._consider(optimizer, before_step=True)
        except Exception as exc:
            self._fail("the optimizer step pre-hook", exc)

    def _global_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.failed or not self._discovering:
            return
        try:
            if optimizer not in self._decided:
                # No root module ran before the step: forward and backward run inside step(closure).
                self._consider(optimizer, before_step=False)
            else:
                self._quiet_steps += 1  # _complete_step ends discovery when it is time
        except Exception as exc:
            self._fail("the optimizer step post-hook", exc)

    def _consider(self, optimizer: torch.optim.Optimizer, before_step: bool) -> None:
        if optimizer in self._decided:
            return
        from healthd_client.attachment import yielding
        from healthd_client.monitor import attached

        if any(not m.closed and m not in yielding for m in list(attached.values())):
            # The script attaches healthd itself (attach(), or the Lightning / Hugging Face callback): it chose
            # what to monitor, and an optimizer it left out stays out, as with one optimizer.
            self._decided.add(optimizer)
            self._quiet_steps = 0
            if not self._watches:
                self._settle_explicit()
            elif attached.get(optimizer) is None:
                self._log_once("explicit", "healthd: this script attaches healthd itself; auto-attach leaves "
                               "its other optimizers (%s) alone", type(optimizer).__name__)
            return
        if len(self._watches) >= MAX_STREAMS:
            self._decided.add(optimizer)
            self._log_once("max_streams", "healthd: auto-attach monitors at most %d optimizers per process "
                           "(healthd's default max_streams_per_job); this %s is not monitored",
                           MAX_STREAMS, type(optimizer).__name__)
            return
        model = self._find_model(optimizer)
        if model is None:
            if before_step:
                return  # forward and backward may run inside step(closure): the post-hook looks again
            if not self._watches:
                raise RuntimeError("no module holding the optimizer's parameters ran a forward pass before its step")
            # A parameter of no module (SAC's learned temperature log_alpha): the monitored optimizers go on.
            self._decided.add(optimizer)
            self._log_once("no_model", "healthd: no module holding the parameters of this %s ran a forward "
                           "pass; it is not monitored", type(optimizer).__name__)
            return
        self._decided.add(optimizer)
        self._quiet_steps = 0
        if id(model) in self._by_model:  # e.g. Muon for the matrices and AdamW for the rest of one model
            self._log_once("same_model", "healthd: auto-attach monitors one optimizer per model; this %s of %s "
                           "is not monitored", type(optimizer).__name__, type(model).__name__)
            return
        loss_module = next((m for m in self._loss_roots if m is not model and not any(True for _ in m.parameters())),
                           None)
        named = bool(self._watches) or self._another_model_trains(model, optimizer)
        stream = stream_name(model, len(self._watches), self._streams_taken()) if named else None
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
        if stream is not None:
            kwargs["stream"] = stream  # absent for the first optimizer: a single-optimizer job is as before
            kwargs["loss_kind"] = several_models_loss_kind()
        watch = _Watch(optimizer, model, stream)
        watch.batch = self._root_batch.get(model)
        watch.monitor = attach(model, optimizer, **kwargs)
        yielding.add(watch.monitor)
        self._watches.append(watch)
        self.done = True
        # The global forward hooks look for the models and the loss modules, not hooks on them: a hook
        # on a module is pickled with it (torch.save(model) would carry healthd into the checkpoint, and a
        # weights-only load would refuse it) and copied by deepcopy. The price: every module call in the
        # process goes through one more Python call (auto-attach is opt-in; explicit attach has none).
        self._by_model[id(model)] = watch
        if loss_module is not None:
            self._loss_modules[id(loss_module)] = weakref.ref(loss_module)
        # After the monitor's own post-hook (hooks run in registration order): the step's record is open.
        watch.handle = optimizer.register_step_post_hook(functools.partial(self._complete_step, watch))
        if not before_step:
            watch.loss_seen, watch.batch = self._loss_seq, None  # not measured: the monitor starts at the next step
        else:
            # This optimizer never stepped: its step reports the last loss captured so far (its own backward's).
            watch.loss_seen = self._loss_seq - 1 if self._loss is not None else self._loss_seq
        logger.info("healthd: auto-attached to %s (%s) for job %r%s; loss from %s", type(model).__name__,
                    type(optimizer).__name__, kwargs["job"], "" if stream is None else f", stream {stream!r}",
                    "the model's output" if loss_module is None else type(loss_module).__name__)

    def _another_model_trains(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Whether a root other than ``model`` ran a forward with grad on and holds trainable parameters that
        ``optimizer`` does not: a second model another optimizer will step (a GAN's generator before its
        discriminator's first step). Then the first optimizer's stream is named too; with one model (frozen
        teachers and EMA copies hold no trainable parameters or run under no_grad) it stays unnamed."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return any(other is not model and any(p.requires_grad and id(p) not in held for p in other.parameters())
                   for other in list(self._root_batch))

    def _streams_taken(self) -> set[str | None]:
        from healthd_client.monitor import attached

        return {w.stream for w in self._watches} | {m.stream for m in list(attached.values()) if not m.closed}

    def _settle_explicit(self) -> None:
        """An explicit attach won before any optimizer was watched: nothing to watch, the module hooks go (a
        compiled model recompiles once). The global optimizer hooks stay and return at once: removing them
        from inside torch's loop over them would break that loop."""
        self.done = True
        self._discovering = False
        self._close_window()
        self._drop_module_hooks()
        self._forget_roots()
        self._loss = None

    def _forget_roots(self) -> None:
        self._roots, self._root_batch = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
        self._loss_roots = weakref.WeakKeyDictionary()

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

    def _model_forward(self, watch: _Watch, args: Any, kwargs: Any, output: Any) -> None:
        try:
            if self.failed or not torch.is_grad_enabled():
                return  # evaluation
            loss = _scalar_loss(output)
            if loss is not None:
                self._take_loss(loss, from_backward=False)
            batch = _batch_size(args, kwargs)
            if batch is not None:
                watch.batch = batch + (watch.batch or 0)
            self._open_window()
        except Exception as exc:
            self._fail("the model's forward hook", exc)

    def _loss_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        try:
            if self.failed:
                return
            loss = _scalar_loss(output)
            if loss is not None:
                self._take_loss(loss, from_backward=False)
        except Exception as exc:
            self._fail("the loss module's forward hook", exc)

    def _step_loss(self, watch: _Watch) -> torch.Tensor | None:
        """This step's loss: the last one captured since this optimizer's previous step (see the module
        docstring), divided by the GradScaler's scale when ``scaler.step`` drives the step."""
        if self._loss_seq <= watch.loss_seen:
            return None
        watch.loss_seen = self._loss_seq
        loss = self._loss
        if loss is None or not self._loss_from_backward:
            return loss
        scaler = _stepping_scaler()
        if scaler is None:
            return loss
        # ``scale(ones)`` is the scale factor as a tensor on the loss's device: a device op, no host sync (where
        # ``get_scale()`` calls ``.item()``). It is the scale backward() ran with: ``update()`` changes it only
        # after ``step()`` returns.
        return loss / scaler.scale(torch.ones((), dtype=loss.dtype, device=loss.device))

    def _complete_step(self, watch: _Watch, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.failed:
            return
        try:
            # Torch is looping over this optimizer's own post-hooks, not yet over the global ones.
            if self._discovering and self._quiet_steps >= _DISCOVERY_STEPS:
                self._end_discovery()
            monitor = watch.monitor
            loss = self._step_loss(watch)
            batch, watch.batch = watch.batch, None
            if monitor is None or monitor.closed:  # closed, or replaced by an explicit attach()
                self._unwatch(watch)
                return
            monitor.step(loss=loss, batch_size=batch)
        except TrainingStopped:
            raise  # HEALTHD_STOP_ON: the job asked for this; it leaves optimizer.step() as from monitor.step()
        except Exception as exc:
            self._fail("the optimizer step post-hook", exc)

    def _end_discovery(self) -> None:
        """No new optimizer for a while: the global optimizer hooks go, the module hooks keep to the watched models."""
        for handle in self._optimizer_handles:
            handle.remove()
        self._optimizer_handles = []
        self._discovering = False
        self._forget_roots()

    def _unwatch(self, watch: _Watch) -> None:
        if self._by_model.get(id(watch.model())) is watch:
            del self._by_model[id(watch.model())]
        if not self._by_model and not self._discovering:
            self._close_window()
            self._drop_module_hooks()


def snake_case(name: str) -> str:
    """``GANDiscriminator`` -> ``gan_discriminator``: a class name as a stream name could spell it."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    return re.sub(r"[^a-z0-9_.-]+", "_", words).strip("_.-")[:32].strip("_.-")


def stream_name(model: torch.nn.Module, index: int, taken: set[str | None]) -> str:
    """The stream of the ``index``-th optimizer to step (the first has the unnamed stream): its model's class
    name, snake_cased, when the class is the job's own (``Generator`` -> ``generator``); ``optimizer_<index>``
    when it is one of torch's (``Sequential``, ``Linear``: they name no role) or the name is taken. The same on
    every rank and every run of a program: the order optimizers first step in is the program's."""
    inner: Any = model
    for _ in range(4):  # DDP / FSDP1 (.module) and torch.compile (._orig_mod) wrappers
        unwrapped = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if not isinstance(unwrapped, torch.nn.Module) or type(inner).__module__.split(".")[0] != "torch":
            break
        inner = unwrapped
    from healthd_client.attachment import STREAM_NAME

    cls = type(inner)
    name = snake_case(cls.__name__) if cls.__module__.split(".")[0] != "torch" else ""
    if name and STREAM_NAME.fullmatch(name) and name not in taken:
        return name
    n = index
    while f"optimizer_{n}" in taken:
        n += 1
    return f"optimizer_{n}"


def _stepping_scaler() -> torch.amp.GradScaler | None:
    """The ``torch.amp.GradScaler`` whose ``step()`` is running ``optimizer.step()`` now, if one is.

    Why frames: GradScaler offers no hook, and the optimizer step hooks are not told who called ``step()``.
    What is read is public: the ``self`` of a running ``GradScaler.step`` (a documented method whose contract
    is to call ``optimizer.step()``), found by walking at most ``_SCALER_FRAMES`` caller frames of this step
    hook. The alternatives read privates: the scaler's ``_scale``, or the ``_amp_foreach_non_finite_check_and_
    unscale_`` call that ``unscale_`` makes under the backward window. Without a scaler found, the loss is
    reported as it was captured.
    """
    frame: FrameType | None = sys._getframe(2)
    for _ in range(_SCALER_FRAMES):
        if frame is None:
            return None
        if frame.f_code.co_name == "step":
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.amp.GradScaler):
                return owner if owner.is_enabled() else None
        frame = frame.f_back
    return None


_installed: AutoAttach | None = None


def install() -> AutoAttach:
    """Install the process's auto-attach hooks (idempotent); called by ``healthd_client.bootstrap``."""
    global _installed
    if _installed is None:
        _installed = AutoAttach()
        _installed.install()
    return _installed
