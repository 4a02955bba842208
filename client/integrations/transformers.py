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
- ``on_step_end`` / ``on_log``: ``monitor.step(loss=, batch_size=)``. The Trainer
  does not hand callbacks the step's loss; it logs the mean loss since the last
  log every ``logging_steps``. At a logging step the report waits for ``on_log``
  and carries that loss (exactly the step's loss with ``logging_steps=1``);
  other steps are reported without a loss. ``batch_size`` is
  ``per_device_train_batch_size`` (the Trainer does not show callbacks the batch).
  Note the Trainer's ``logging_nan_inf_filter`` (on by default) replaces a NaN
  loss in its logs; NaN/Inf gradients are still counted by healthd_client.
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

import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import healthd_client
from healthd_client.monitor import Monitor
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
        if control.should_log:  # set by DefaultFlowCallback, which runs before user callbacks
            self._awaiting_log = True
        else:
            self.monitor.step(batch_size=self._batch_size)
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
        if self.monitor is not None:
            self._flush(None)
            self.monitor.close()
