"""Hugging Face transformers: ``HealthdCallback``, a ``TrainerCallback`` that drives the same Monitor as ``attach``.

Usage::

    from healthd_client.integrations.transformers import HealthdCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[HealthdCallback(job="run-7", server="http://healthd:9184")])

What it does at the Trainer's hook points (no measurement code of its own; the
quantities are ``healthd_client``'s). ``on_pre_optimizer_step`` and
``on_optimizer_step`` exist from transformers 4.45.

- ``on_train_begin``: ``healthd_client.attach(model, optimizer, ...)`` on the torch
  optimizer inside Accelerate's wrapper, with ``args.process_index``,
  ``args.world_size``, ``args.gradient_accumulation_steps``, the train set's size
  and the transformers version in the setup report.
- ``on_pre_optimizer_step``: ``monitor.before_optimizer_step()``: the gradients are
  final and clipped (``max_grad_norm``), the parameters not yet updated. The
  optimizer's step post-hook measures the update.
- ``on_step_end``: ``monitor.step(loss=, batch_size=)``. The Trainer does not
  hand callbacks the step's loss, and logs a mean only every ``logging_steps``
  (500 by default), so the loss is read where the model returns it: a global
  forward hook (``ForwardTap``, not a hook on the user's module) takes the
  ``loss`` of the model's output (a ``ModelOutput``, or a dict) at each training
  forward, as the device tensor it is (no host sync). Under gradient
  accumulation the step's loss is the mean of its micro-batches' losses (what
  the Trainer logs for the step, before its own scaling by the accumulation
  steps). A model whose output carries no ``loss`` (a ``compute_loss`` of the
  user's) falls back to the logged loss at logging steps (the report then waits
  for ``on_log``), but only with ``logging_nan_inf_filter=False``: the filter (on
  by default) logs the mean of earlier losses in place of a NaN/Inf one, and a
  substituted value is never reported as the step's loss (no loss is, instead).
  ``batch_size`` is ``per_device_train_batch_size`` (the Trainer does not show
  callbacks the batch).
- ``on_evaluate``: ``monitor.eval`` with ``eval_loss``, ``eval_accuracy`` and the
  other numeric ``eval_*`` metrics.
- ``on_train_end``: ``monitor.close()``.
- alerts: with ``stop_on=("NonFiniteValues",)`` (and ``on_stop=``, ``on_alert=``, as for
  ``attach``), the step after healthd reports such an alert sets
  ``control.should_training_stop`` (after ``on_stop(alert)``) instead of raising
  ``TrainingStopped``; ``callback.monitor.stopped_by`` holds the alert.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import healthd_client
from healthd_client.layers import unwrap_model
from healthd_client.monitor import Monitor
from healthd_client.quantities.forward_tap import ForwardTap
from healthd_client.quantities.framework_versions import FrameworkVersions

_RESERVED = ("rank", "world_size", "grad_accumulation_steps")
_NOT_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")


class HealthdCallback(TrainerCallback):
    """Report a ``transformers.Trainer`` run to healthd. Arguments are ``healthd_client.attach``'s.

    ``job`` and ``server`` default to $HEALTHD_JOB / $HEALTHD_SERVER; ``attach_kwargs``
    go to ``attach`` (``num_classes``, ``config``, ``token``, ``transport``, ...). Rank,
    world size and gradient accumulation come from ``TrainingArguments``.
    """

    def __init__(self, job: str | None = None, server: str | None = None, **attach_kwargs: Any) -> None:
        clash = [k for k in _RESERVED if k in attach_kwargs]
        if clash:
            raise ValueError(f"{clash[0]} is taken from TrainingArguments; do not pass it to HealthdCallback")
        self.job = job
        self.server = server
        self.attach_kwargs = attach_kwargs
        self.monitor: Monitor | None = None
        self._awaiting_log = False
        self._batch_size: int | None = None
        self._tap = ForwardTap(post=self._on_forward)
        self._loss_sum: torch.Tensor | None = None  # this optimizer step's micro-batch losses, on the device
        self._loss_count = 0
        self._saw_model_loss = False  # the model's output carries its loss: the logs are never needed
        self._logged_loss_is_real = False  # logging_nan_inf_filter is off

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, train_dataloader: Any = None, **kw: Any) -> None:
        if self.monitor is not None and not self.monitor.closed:
            return
        if model is None or optimizer is None:
            raise ValueError("healthd: the Trainer passed no model/optimizer to on_train_begin")
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        kwargs = dict(self.attach_kwargs)
        if "dataset_size" not in kwargs:
            try:
                kwargs["dataset_size"] = int(len(train_dataloader.dataset))
            except Exception:
                kwargs["dataset_size"] = None
        extra = [*kwargs.pop("extra_quantities", ()), FrameworkVersions({"transformers": transformers.__version__})]
        self._batch_size = int(args.per_device_train_batch_size)
        self.monitor = healthd_client.attach(
            model, raw, self.job, self.server, rank=int(args.process_index), world_size=int(args.world_size),
            grad_accumulation_steps=max(1, int(args.gradient_accumulation_steps)), extra_quantities=extra, **kwargs,
        )
        self.monitor.open_steps_externally()
        self.monitor.stop_externally()
        self._logged_loss_is_real = not bool(getattr(args, "logging_nan_inf_filter", True))
        self._tap.watch(unwrap_model(model), "root")
        self._tap.arm()

    def _on_forward(self, name: str, output: Any) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation and generation
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        self._saw_model_loss = True
        value = loss.detach().float().reshape(())
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def _step_loss(self) -> torch.Tensor | None:
        total, count = self._loss_sum, self._loss_count
        self._loss_sum, self._loss_count = None, 0
        return None if total is None else total / count

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kw: Any) -> None:
        if self.monitor is not None:
            self._flush(None)  # a step whose log never came
            self.monitor.before_optimizer_step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kw: Any) -> None:
        pass  # the optimizer's step post-hook already measured the update

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.monitor is None:
            return
        loss = self._step_loss()
        if loss is None and not self._saw_model_loss and self._logged_loss_is_real and control.should_log:
            self._awaiting_log = True  # should_log is set by DefaultFlowCallback, which runs before user callbacks
        else:
            self.monitor.step(loss=loss, batch_size=self._batch_size)
        if self.monitor.stopped_by is not None:
            control.should_training_stop = True

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kw: Any) -> None:
        if self._awaiting_log and logs is not None and "loss" in logs:
            self._flush(logs["loss"])

    def _flush(self, loss: float | None) -> None:
        if self._awaiting_log and self.monitor is not None:
            self._awaiting_log = False
            self.monitor.step(loss=loss, batch_size=self._batch_size)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kw: Any) -> None:
        if self.monitor is None or not metrics:
            return
        values = {k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                  if k.startswith("eval_") and k not in _NOT_METRICS
                  and isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)}
        self.monitor.eval(loss=values.pop("loss", None), accuracy=values.pop("accuracy", None), **values)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._tap.disarm()
        if self.monitor is not None:
            self._flush(None)
            self.monitor.close()
