"""PyTorch Lightning: ``HealthdCallback``, a ``Callback`` that drives the same Monitor as ``attach``.

Usage::

    from healthd_client.integrations.lightning import HealthdCallback
    trainer = lightning.Trainer(callbacks=[HealthdCallback(job="run-7", server="http://healthd:9184")])

What it does at Lightning's hook points (no measurement code of its own; the
quantities are ``healthd_client``'s):

- ``on_train_start``: ``healthd_client.attach(pl_module, optimizer, ...)`` (under ``FSDPStrategy``, the
  root FSDP unit around ``pl_module``, which says which parameters are shards) for every optimizer of
  ``configure_optimizers`` (at most ``MAX_OPTIMIZERS``), with the trainer's global rank, world size
  and ``accumulate_grad_batches``, the train set's size when it has one, and Lightning's version in
  the setup report. One optimizer reports on the unnamed stream (or ``stream=``), as before;
  several report one named stream each: ``streams=`` names them (a sequence by index, or a mapping
  from index to name), else ``optimizer_0``, ``optimizer_1``, ...
- ``on_before_optimizer_step``: ``monitor.before_optimizer_step()``. Lightning runs
  forward and backward *inside* ``optimizer.step(closure)``, so the optimizer's
  own step pre-hook would see last step's gradients; this hook is the moment
  the gradients are final (after unscaling, before clipping by Lightning's
  ``gradient_clip_val``, which clips later, in the same call).
- ``on_train_batch_end`` (automatic optimization, one optimizer: Lightning 2 refuses several):
  ``monitor.step(loss=, batch_size=)`` once per optimizer step, with the mean loss of the
  micro-batches accumulated into it (a device tensor: no host sync) and their mean batch size
  (healthd multiplies it by ``accumulate_grad_batches`` and the world size for the global batch).
- manual optimization (``self.automatic_optimization = False``, ``self.optimizers()``,
  ``self.manual_backward``): each ``opt.step()`` in ``training_step`` is one step of that
  optimizer's stream. Its loss is the mean of the losses passed to ``manual_backward`` since the
  previous optimizer step (``on_before_backward``: device tensors, no host sync): in a GAN, the
  discriminator's loss for the discriminator's step and the generator's for the generator's; an
  optimizer that steps on the same backward as the one before it (one loss, two optimizers) gets
  that loss. Under a ``GradScaler`` (``precision="16-mixed"`` on a GPU, or a ``MixedPrecision`` plugin
  given a scaler) the loss Lightning hands that hook is ``scaler.scale(loss)``: it is divided by
  ``scaler.scale(1)`` of the plugin's public ``scaler`` at that moment, the scale that multiplied it (a
  device op: ``get_scale()`` would sync). A step's record is completed at that
  optimizer's next step or at the batch's end, whichever comes first, so several steps of one
  optimizer in one ``training_step`` (a WGAN critic's inner loop) are several steps.
- validation: the losses your ``validation_step`` returns (a tensor or a dict
  with ``"loss"``) are averaged, weighted by batch size; without them the
  logged ``val_loss_key`` metric is used. ``monitor.eval`` gets that loss and
  the other logged metrics whose names start with ``val``. Sanity checking is skipped.
  With several optimizers, validation is reported on the first one's stream.
- ``on_fit_end`` / ``on_exception``: ``monitor.close()``.
- alerts: with ``stop_on=("NonFiniteValues",)`` (and ``on_stop=``, ``on_alert=``, as for
  ``attach``), the optimizer step after healthd reports such an alert sets
  ``trainer.should_stop`` (after ``on_stop(alert)``) instead of raising ``TrainingStopped``:
  Lightning then ends the fit at the end of that batch, calling ``on_fit_end`` as usual.
  ``callback.monitor.stopped_by`` holds the alert.

``callback.monitors`` maps each stream to its Monitor; ``callback.monitor`` is the first optimizer's.
An optimizer stepped without Lightning (``opt.optimizer.step()``, the torch optimizer itself) skips
``on_before_optimizer_step``: its steps are not reported.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

import healthd_client
from healthd_client.monitor import Monitor
from healthd_client.quantities.framework_versions import FrameworkVersions

_RESERVED = ("rank", "world_size", "grad_accumulation_steps")
# Streams are a bounded label: a module with more optimizers than this has its first ones monitored.
MAX_OPTIMIZERS = 8


@dataclass
class _Stream:
    """One optimizer's monitor and the step it has open (stepped, not yet completed with ``step()``)."""

    monitor: Monitor
    optimizer: torch.optim.Optimizer
    stepped: bool = False
    loss: torch.Tensor | None = None


def _stream_names(streams: Sequence[str] | Mapping[int, str] | None, count: int,
                  single: str | None) -> list[str | None]:
    """The stream of each of ``count`` optimizers: ``streams`` by index, else ``single`` for one, else by index."""
    if streams is None:
        return [single] if count == 1 else [f"optimizer_{i}" for i in range(count)]
    named = dict(streams) if isinstance(streams, Mapping) else dict(enumerate(streams))
    return [named.get(i, f"optimizer_{i}") for i in range(count)]


def _loss_of(outputs: Any) -> torch.Tensor | None:
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"].detach()
    return None


def _batch_size(batch: Any) -> int | None:
    from lightning.pytorch.utilities.data import extract_batch_size

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "trying to infer the batch_size from an ambiguous collection"
            return int(extract_batch_size(batch))
    except Exception:
        return None


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().float().cpu())  # validation end: a host sync is acceptable
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _sharding_root(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.nn.Module:
    """The module to attach: the LightningModule, or ``FSDPStrategy``'s root FSDP1 unit around it.

    FSDP1 keeps what says a parameter is a shard (the unit, its process group, its sharding strategy) on
    the wrapper. ``FSDPStrategy`` wraps the LightningModule itself in the root unit, so the module alone
    shows no unit holding the parameters left to the root (all of them without an ``auto_wrap_policy``),
    and each rank's shard would be reported as the job's value. ``ModelParallelStrategy`` (FSDP2) needs
    nothing: its parameters are DTensors that say so themselves.
    """
    wrapped = trainer.model  # public: the module as the strategy wrapped it
    if wrapped is None or wrapped is pl_module or not torch.distributed.is_available():
        return pl_module
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(wrapped, FullyShardedDataParallel) and wrapped.module is pl_module:
        return wrapped
    return pl_module


class HealthdCallback(pl.Callback):
    """Report a Lightning run to healthd. Arguments are ``healthd_client.attach``'s.

    ``job`` and ``server`` default to $HEALTHD_JOB / $HEALTHD_SERVER;
    ``val_loss_key`` names the logged metric used as the validation loss when
    ``validation_step`` returns none; ``streams`` names the streams of several optimizers (by index:
    ``("generator", "discriminator")`` or ``{0: "generator", 1: "discriminator"}``); ``attach_kwargs``
    go to every optimizer's ``attach`` (``num_classes``, ``loss_kind``, ``config``, ``token``,
    ``transport``, ...). Rank, world size and gradient accumulation come from the Trainer.
    """

    def __init__(self, job: str | None = None, server: str | None = None, *, val_loss_key: str = "val_loss",
                 streams: Sequence[str] | Mapping[int, str] | None = None, **attach_kwargs: Any) -> None:
        super().__init__()
        if not isinstance(val_loss_key, str) or not val_loss_key:
            raise ValueError(f"val_loss_key must be a non-empty str, got {val_loss_key!r}")
        clash = [k for k in _RESERVED if k in attach_kwargs]
        if clash:
            raise ValueError(f"{clash[0]} is taken from the Trainer; do not pass it to HealthdCallback")
        if streams is not None:
            if "stream" in attach_kwargs:
                raise ValueError("pass streams= (one name per optimizer) or stream= (one optimizer), not both")
            names = list(streams.items()) if isinstance(streams, Mapping) else list(enumerate(streams))
            bad = [(i, n) for i, n in names if isinstance(i, bool) or not isinstance(i, int) or i < 0
                   or not isinstance(n, str)]
            if isinstance(streams, str) or bad:
                raise ValueError(f'streams must be a sequence of names by optimizer index, e.g. ("generator", '
                                 f'"discriminator"), or a mapping {{index: name}}, got {streams!r}')
            if len({n for _, n in names}) != len(names):
                raise ValueError(f"streams must name each optimizer differently, got {streams!r}")
        self.job = job
        self.server = server
        self.val_loss_key = val_loss_key
        self.streams = streams
        self.attach_kwargs = attach_kwargs
        self.monitors: dict[str | None, Monitor] = {}
        self._by_optimizer: dict[int, _Stream] = {}  # id(torch optimizer) -> its stream
        self._manual = False
        self._stepped = False
        self._losses: list[torch.Tensor] = []
        self._examples = 0
        self._micro_batches = 0
        self._batch_examples: int | None = None
        self._backward_losses: list[torch.Tensor] = []
        self._last_loss: torch.Tensor | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self._val_sum: torch.Tensor | None = None
        self._val_count = 0

    @property
    def monitor(self) -> Monitor | None:
        """The first optimizer's monitor (the only one with a single optimizer); None before training."""
        return next(iter(self.monitors.values()), None)

    # ------------------------------------------------------------------ training

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitors and not all(m.closed for m in self.monitors.values()):
            return
        self.monitors, self._by_optimizer = {}, {}
        optimizers = list(trainer.optimizers)
        if not optimizers:
            warnings.warn("healthd: the Trainer has no optimizer; nothing to monitor", RuntimeWarning, stacklevel=2)
            return
        if len(optimizers) > MAX_OPTIMIZERS:
            warnings.warn(f"healthd: {len(optimizers)} optimizers; monitoring the first {MAX_OPTIMIZERS} "
                          f"(a stream each, and streams are a bounded label)", RuntimeWarning, stacklevel=2)
            optimizers = optimizers[:MAX_OPTIMIZERS]
        kwargs = dict(self.attach_kwargs)
        single = kwargs.pop("stream", None)
        kwargs.setdefault("dataset_size", self._dataset_size(trainer))
        extra = [*kwargs.pop("extra_quantities", ()), FrameworkVersions({"lightning": pl.__version__})]
        self._manual = not pl_module.automatic_optimization
        # A GradScaler scales the loss before on_before_backward sees it (see the module docstring).
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None
        model = _sharding_root(trainer, pl_module)
        for optimizer, name in zip(optimizers, _stream_names(self.streams, len(optimizers), single), strict=True):
            monitor = healthd_client.attach(
                model, optimizer, self.job, self.server, rank=trainer.global_rank,
                world_size=trainer.world_size, grad_accumulation_steps=max(1, int(trainer.accumulate_grad_batches)),
                extra_quantities=extra, stream=name, **kwargs,
            )
            monitor.open_steps_externally()
            monitor.stop_externally()
            self.monitors[name] = monitor
            self._by_optimizer[id(optimizer)] = _Stream(monitor, optimizer)

    @staticmethod
    def _dataset_size(trainer: pl.Trainer) -> int | None:
        dataset = getattr(trainer.train_dataloader, "dataset", None)  # a DataLoader, or a combined/None loader
        if not isinstance(dataset, Sized):
            return None
        try:
            return len(dataset)
        except Exception:  # an iterable-style dataset whose __len__ raises
            return None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_examples = _batch_size(batch)
        self._last_loss = None  # an optimizer stepping without a backward of this batch has no loss

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._manual and isinstance(loss, torch.Tensor):
            loss = loss.detach()
            if self._scaler is not None:  # the scale that multiplied it: update() runs after the step
                loss = loss / self._scaler.scale(torch.ones((), dtype=loss.dtype, device=loss.device))
            self._backward_losses.append(loss)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        stream = self._by_optimizer.get(id(raw))
        if stream is None or stream.optimizer is not raw or stream.monitor.closed:
            return
        if not self._manual:
            stream.monitor.before_optimizer_step()
            self._stepped = True
            return
        if stream.stepped:  # its second step in this training_step: complete the first
            self._complete(stream)
        if self._backward_losses:
            self._last_loss = torch.stack(self._backward_losses).float().mean()
            self._backward_losses = []
        stream.loss, stream.stepped = self._last_loss, True
        stream.monitor.before_optimizer_step()

    def _complete(self, stream: _Stream) -> None:
        stream.monitor.step(loss=stream.loss, batch_size=self._batch_examples)
        stream.stepped, stream.loss = False, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._by_optimizer:
            return
        if self._manual:
            for stream in self._by_optimizer.values():
                if stream.stepped:
                    self._complete(stream)
            if any(m.stopped_by is not None for m in self.monitors.values()):
                trainer.should_stop = True
            return
        monitor = self.monitor
        if monitor is None:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            self._losses.append(loss)
        self._examples += _batch_size(batch) or 0
        self._micro_batches += 1
        if not self._stepped:  # accumulating gradients: the optimizer has not stepped yet
            return
        mean = torch.stack(self._losses).float().mean() if self._losses else None
        monitor.step(loss=mean, batch_size=round(self._examples / self._micro_batches) or None)
        self._stepped, self._losses, self._examples, self._micro_batches = False, [], 0, 0
        if monitor.stopped_by is not None:
            trainer.should_stop = True

    # ------------------------------------------------------------------ validation

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_sum, self._val_count = None, 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = _loss_of(outputs)
        if self.monitor is None or trainer.sanity_checking or loss is None:
            return
        n = _batch_size(batch) or 1
        weighted = loss.float().mean() * n
        self._val_sum = weighted if self._val_sum is None else self._val_sum + weighted
        self._val_count += n

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking:
            return
        logged = trainer.callback_metrics
        loss = _scalar(self._val_sum / self._val_count) if self._val_sum is not None and self._val_count else None
        if loss is None:
            loss = _scalar(logged.get(self.val_loss_key))
        metrics = {}
        for name, value in logged.items():
            v = _scalar(value)
            if name.startswith("val") and name != self.val_loss_key and v is not None and not math.isnan(v):
                metrics[name] = v
        accuracy = metrics.pop("val_acc", metrics.pop("val_accuracy", None))
        self.monitor.eval(loss=loss, accuracy=accuracy, **metrics)

    # ------------------------------------------------------------------ end

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        for monitor in self.monitors.values():
            monitor.close()
