"""PyTorch Lightning: ``HealthdCallback``, a ``Callback`` that drives the same Monitor as ``attach``.

Usage::

    from healthd_client.integrations.lightning import HealthdCallback
    trainer = lightning.Trainer(callbacks=[HealthdCallback(job="run-7", server="http://healthd:9184")])

What it does at Lightning's hook points (no measurement code of its own; the
quantities are ``healthd_client``'s):

- ``on_train_start``: ``healthd_client.attach(pl_module, trainer.optimizers[0], ...)`` with the
  trainer's global rank, world size and ``accumulate_grad_batches``, the train
  set's size when it has one, and Lightning's version in the setup report.
- ``on_before_optimizer_step``: ``monitor.before_optimizer_step()``. Lightning runs
  forward and backward *inside* ``optimizer.step(closure)``, so the optimizer's
  own step pre-hook would see last step's gradients; this hook is the moment
  the gradients are final (after unscaling, before clipping by Lightning's
  ``gradient_clip_val``, which clips later, in the same call).
- ``on_train_batch_end``: ``monitor.step(loss=, batch_size=)`` once per optimizer
  step, with the mean loss of the micro-batches accumulated into it (a device
  tensor: no host sync) and their mean batch size (healthd multiplies it by
  ``accumulate_grad_batches`` and the world size for the global batch).
- validation: the losses your ``validation_step`` returns (a tensor or a dict
  with ``"loss"``) are averaged, weighted by batch size; without them the
  logged ``val_loss_key`` metric is used. ``monitor.eval`` gets that loss and
  the other logged metrics whose names start with ``val``. Sanity checking is skipped.
- ``on_fit_end`` / ``on_exception``: ``monitor.close()``.
- alerts: with ``stop_on=("NonFiniteValues",)`` (and ``on_stop=``, ``on_alert=``, as for
  ``attach``), the optimizer step after healthd reports such an alert sets
  ``trainer.should_stop`` (after ``on_stop(alert)``) instead of raising ``TrainingStopped``:
  Lightning then ends the fit at the end of that batch, calling ``on_fit_end`` as usual.
  ``callback.monitor.stopped_by`` holds the alert.

Only the first optimizer is monitored (one Monitor per optimizer); manual
optimization works if your ``training_step`` calls ``optimizer.step()`` on
that optimizer (then ``on_before_optimizer_step`` still fires).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sized
from typing import Any

import lightning.pytorch as pl
import torch

import healthd_client
from healthd_client.monitor import Monitor
from healthd_client.quantities.framework_versions import FrameworkVersions

_RESERVED = ("rank", "world_size", "grad_accumulation_steps")


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


class HealthdCallback(pl.Callback):
    """Report a Lightning run to healthd. Arguments are ``healthd_client.attach``'s.

    ``job`` and ``server`` default to $HEALTHD_JOB / $HEALTHD_SERVER;
    ``val_loss_key`` names the logged metric used as the validation loss when
    ``validation_step`` returns none; ``attach_kwargs`` go to ``attach``
    (``num_classes``, ``config``, ``token``, ``transport``, ...). Rank, world size and
    gradient accumulation come from the Trainer.
    """

    def __init__(self, job: str | None = None, server: str | None = None, *, val_loss_key: str = "val_loss",
                 **attach_kwargs: Any) -> None:
        super().__init__()
        if not isinstance(val_loss_key, str) or not val_loss_key:
            raise ValueError(f"val_loss_key must be a non-empty str, got {val_loss_key!r}")
        clash = [k for k in _RESERVED if k in attach_kwargs]
        if clash:
            raise ValueError(f"{clash[0]} is taken from the Trainer; do not pass it to HealthdCallback")
        self.job = job
        self.server = server
        self.val_loss_key = val_loss_key
        self.attach_kwargs = attach_kwargs
        self.monitor: Monitor | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._stepped = False
        self._losses: list[torch.Tensor] = []
        self._examples = 0
        self._micro_batches = 0
        self._val_sum: torch.Tensor | None = None
        self._val_count = 0

    # ------------------------------------------------------------------ training

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and not self.monitor.closed:
            return
        if not trainer.optimizers:
            warnings.warn("healthd: the Trainer has no optimizer; nothing to monitor", RuntimeWarning, stacklevel=2)
            return
        if len(trainer.optimizers) > 1:
            warnings.warn("healthd: several optimizers; monitoring the first only", RuntimeWarning, stacklevel=2)
        self._optimizer = trainer.optimizers[0]
        kwargs = dict(self.attach_kwargs)
        kwargs.setdefault("dataset_size", self._dataset_size(trainer))
        extra = [*kwargs.pop("extra_quantities", ()), FrameworkVersions({"lightning": pl.__version__})]
        self.monitor = healthd_client.attach(
            pl_module, self._optimizer, self.job, self.server, rank=trainer.global_rank,
            world_size=trainer.world_size, grad_accumulation_steps=max(1, int(trainer.accumulate_grad_batches)),
            extra_quantities=extra, **kwargs,
        )
        self.monitor.open_steps_externally()
        self.monitor.stop_externally()

    @staticmethod
    def _dataset_size(trainer: pl.Trainer) -> int | None:
        dataset = getattr(trainer.train_dataloader, "dataset", None)  # a DataLoader, or a combined/None loader
        if not isinstance(dataset, Sized):
            return None
        try:
            return len(dataset)
        except Exception:  # an iterable-style dataset whose __len__ raises
            return None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if self.monitor is None or raw is not self._optimizer:
            return
        self.monitor.before_optimizer_step()
        self._stepped = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.monitor is None:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            self._losses.append(loss)
        self._examples += _batch_size(batch) or 0
        self._micro_batches += 1
        if not self._stepped:  # accumulating gradients: the optimizer has not stepped yet
            return
        mean = torch.stack(self._losses).float().mean() if self._losses else None
        self.monitor.step(loss=mean, batch_size=round(self._examples / self._micro_batches) or None)
        self._stepped, self._losses, self._examples, self._micro_batches = False, [], 0, 0
        if self.monitor.stopped_by is not None:
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
        if self.monitor is not None:
            self.monitor.close()
