"""The Monitor: hooks on the optimizer, quantity scheduling, reports.

What lives here: the
optimizer step pre/post hooks, the step record life cycle, turning finished
records into StepReport dicts, EvalReport / AttachReport / HeartbeatReport
dicts; acting on the alerts healthd answers with (``on_alert``, ``stop_on``, ``on_stop``) on the
training thread. What does not: the measurements (``quantities/``), the device->host copy
(``packing``), sending and reading the answers (``transport``), resolving attach()'s arguments
(``attachment``).

Failure policy: an exception in a quantity disables that quantity with one
warning; an exception in the monitor's own machinery stops measuring (heartbeats
go on) with one warning. Neither reaches the training loop unless
``strict=True``.

Attaching twice to the same optimizer returns the monitor already attached (with
a warning) rather than replacing it: two monitors would double the hooks, and
replacing would silently drop the first one's unsent records.

Why this module is over 400 lines: a step record's life cycle (opened by the pre-hook, filled by
quantities and ``step()``, packed, read back later, turned into a report) is one state machine over
the Monitor's fields; the parts that stand alone already live elsewhere (alerts' actions in
``alerts``, arguments in ``attachment``, packing, sending).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import operator
import os
import platform
import time
import uuid
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import torch

from healthd_client.alerts import AlertActions, FiringAlert
from healthd_client.config import MonitorConfig
from healthd_client.identity import Identity, git_commit, label_safe
from healthd_client.layers import build_layer_plan
from healthd_client.packing import PackedRecord
from healthd_client.quantities.base import Quantity, QuantityContext, StepRecord
from healthd_client.transport import Sender, Transport

logger = logging.getLogger("healthd_client")

CLIENT_VERSION = "0.1.0"
_MAX_EVAL_METRICS = 32
_MAX_METRIC_NAME_CHARS = 64

# Which optimizer already has a monitor: attach() on the same optimizer must not
# double the hooks. Weak keys, so a dropped optimizer does not stay alive here.
attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, Monitor] = weakref.WeakKeyDictionary()


def warn_user(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _host_float(value: Any) -> float:
    """A float from a number or a one-element tensor (eval path: a sync is acceptable)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().cpu())
    return float(value)


class Monitor:
    """Watches one model + optimizer and reports to healthd. Create it with ``attach``.

    Call ``step(loss=, batch_size=)`` once per optimizer step, ``eval(...)`` after
    validation, ``close()`` at the end (or use it as a context manager).

    Alerts: ``alerts`` is what healthd's latest answer said fires for this job. At the next
    ``step()`` or optimizer step after an answer brought a new alert, on the training thread:
    ``on_alert(alert)`` is called for it; if its rule is in ``stop_on``, ``on_stop(alert)`` is
    called (a checkpoint, say) and ``TrainingStopped`` is raised, once (``stopped_by`` keeps the
    alert). Nothing waits for healthd: an alert arrives with the answer to the push that carried
    its evidence, one round trip later, and acts at the step after.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        job: str,
        identity: Identity,
        transport: Transport,
        token: str | None,
        config: MonitorConfig,
        hints: dict[str, int | bool | str],
        quantities: Sequence[Quantity],
        strict: bool,
        on_alert: Callable[[FiringAlert], object] | None = None,
        stop_on: Collection[str] = (),
        on_stop: Callable[[FiringAlert], object] | None = None,
        stream: str | None = None,
        step_hooks: bool = True,
        not_measured: Mapping[str, str] | None = None,
        stepped: Callable[[], bool] | None = None,
    ) -> None:
        self.job = job
        self.stream = stream  # healthd keeps windows per (job, rank, stream); None: the unnamed stream
        self.monitor_id = uuid.uuid4().hex[:16]  # tells healthd this monitor from another claiming its stream
        self.identity = identity
        self.config = config
        self._model = model
        self._optimizer = optimizer
        self._strict = strict
        self._closed = False
        self._forked = False
        self._active = True  # False once the monitor's own machinery failed
        self._next_step = 0
        self._last_step: int | None = None
        self._open: StepRecord | None = None
        self._pending: deque[PackedRecord] = deque()
        self._disabled: dict[int, str] = {}  # id(quantity) -> name
        self._disabled_why: dict[int, str] = {}  # id(quantity) -> reason, sent in every heartbeat
        # What this kind of job does not let healthd measure at all (name -> reason, e.g. per-layer values
        # under DeepSpeed ZeRO): sent with the disabled quantities, so MonitoringDegraded shows it too.
        self._not_measured = dict(not_measured or {})
        self._bad_batch_size_warned = False
        self._opened_externally = False  # before_optimizer_step() replaced the optimizer's step pre-hook
        self._actions = AlertActions(on_alert, stop_on, on_stop, strict=strict, warn=warn_user)
        plan = build_layer_plan(model, optimizer, config.max_layers)
        self.sender = Sender(transport, config, token=token, heartbeat=self._heartbeat)
        self._ctx = QuantityContext(
            model=model,
            optimizer=optimizer,
            plan=plan,
            config=config,
            identity=identity,
            job=job,
            stream=stream,
            enqueue=self.sender.enqueue,
            degrade=self._degrade,
        )
        self.quantities = list(quantities)
        self._send_attach_report(hints)
        # Without step hooks (an engine that owns its optimizer's step, DeepSpeed: see
        # healthd_client.integrations.deepspeed) every phase runs in step(), after the engine's update.
        self._step_hooks = step_hooks
        # Whether the optimizer stepped since the last step() call (None: always). An engine that is stepped
        # every micro-batch under gradient accumulation updates at the boundaries only (DeepSpeed).
        self._stepped = stepped
        self._handles = [
            optimizer.register_step_pre_hook(_outside_compiled(self._pre_hook)),
            optimizer.register_step_post_hook(_outside_compiled(self._post_hook)),
        ] if step_hooks else []
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _monitor_after_fork(ref))
        atexit.register(self.close)

    # ------------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def layer_names(self) -> list[str]:
        return list(self._ctx.plan.names)

    @property
    def disabled_quantities(self) -> list[str]:
        return [*self._disabled.values(), *self._not_measured]

    @property
    def alerts(self) -> tuple[FiringAlert, ...]:
        """The alerts firing for this job as healthd last answered (any rank's, most severe first)."""
        return self.sender.alerts

    def stop_externally(self) -> None:
        """Do not raise ``TrainingStopped``: the caller reads ``stopped_by`` after ``step()`` and stops
        its loop itself (Lightning's ``trainer.should_stop``, transformers' ``control.should_training_stop``)."""
        self._actions.raise_on_stop = False

    @property
    def stopped_by(self) -> FiringAlert | None:
        """The ``stop_on`` alert that stopped training, once one has."""
        return self._actions.stopped_by

    def step(self, loss: Any = None, batch_size: int | None = None) -> None:
        """Complete the current optimizer step's record with the loss and batch size.

        Then deliver alerts healthd reported since (may raise ``TrainingStopped``, see the class)."""
        if self._closed:
            return
        if self._active and (self._stepped is None or self._stepped()):
            with self._guard("step"):
                record = self._open if self._open is not None else self._new_record()
                self._open = None
                if not self._step_hooks:
                    self._run("before_step", record)
                    self._run("after_step", record)
                record.loss = loss
                record.batch_size = self._batch_size(batch_size)
                record.closed_by_user = True
                self._finish(record)
        self._deliver_alerts()

    def eval(self, loss: Any = None, accuracy: Any = None, **metrics: Any) -> None:
        """Report a validation pass at the last completed step (0 before any step)."""
        if self._closed or self._forked:
            return
        with self._guard("eval", disable=False):
            report: dict[str, Any] = self._base("eval")
            report["step"] = self._last_step if self._last_step is not None else 0
            if loss is not None:
                report["loss"] = _host_float(loss)
            if accuracy is not None:
                report["accuracy"] = _host_float(accuracy)
            values = {}
            for name, value in list(metrics.items())[:_MAX_EVAL_METRICS]:
                key = label_safe(str(name), _MAX_METRIC_NAME_CHARS)  # "val acc" -> "val_acc", not a 422
                if key:
                    values[key] = _host_float(value)
            if values:
                report["metrics"] = values
            if self._active:
                self._poll()
            self.sender.enqueue(report)

    def open_steps_externally(self) -> None:
        """Stop opening step records in the optimizer's step pre-hook; ``before_optimizer_step`` opens them.

        For framework integrations (``healthd_client.integrations``) that know the moment the
        gradients are final better than the optimizer's step pre-hook: Lightning runs forward and
        backward *inside* ``optimizer.step(closure)``, so the pre-hook fires before the gradients
        exist. Call it right after ``attach``; the step post-hook stays (it fires after the update).
        """
        if not self._opened_externally:
            self._opened_externally = True
            if self._handles:
                self._handles[0].remove()

    def before_optimizer_step(self) -> None:
        """Open this step's record now: the gradients are final, the parameters not yet updated.

        Implies ``open_steps_externally()``. Call ``step(loss=, batch_size=)`` afterwards as usual.
        """
        self.open_steps_externally()
        self._pre_hook(self._optimizer, (), {})

    def memory_overhead_bytes(self) -> int:
        """Device/host memory the monitor holds between steps (sample buffers, index tensors)."""
        total = self._ctx.plan.memory_overhead_bytes()
        for q in self.quantities:
            if id(q) not in self._disabled:
                with contextlib.suppress(Exception):
                    total += int(q.memory_overhead_bytes())
        return total

    def close(self, timeout: float | None = None) -> None:
        """Remove the hooks, send what is measured, flush within ``timeout`` seconds. Idempotent.

        A ``per_process`` quantity (the GPU sampler) goes on under another open monitor of this (job, rank)
        when there is one (``adopt``), before this monitor's sender stops; otherwise it closes."""
        if self._closed:
            return
        self._closed = True
        timeout = self.config.close_timeout_seconds if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + timeout
        for handle in self._handles:
            handle.remove()
        if attached.get(self._optimizer) is self:
            del attached[self._optimizer]
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._forked:
            return
        if self._active:
            with self._guard("close"):
                if self._open is not None:
                    record, self._open = self._open, None
                    self._finish(record)
                self._drain_pending(deadline - timeout / 2)  # keep half the time for sending
        heir = self._heir()
        for q in self.quantities:
            if q.per_process and heir is not None and id(q) not in self._disabled and heir.adopt(q):
                continue
            with contextlib.suppress(Exception):
                q.close()
        self.sender.close(max(0.0, deadline - time.monotonic()))

    def _heir(self) -> Monitor | None:
        """Another open monitor of this (job, rank) in this process: it takes over the ``per_process``
        quantities (the GPU sampler) when this one closes, so they go on without a gap."""
        return next((m for m in list(attached.values()) if m is not self and not m.closed and not m._forked
                     and (m.job, m.identity.rank) == (self.job, self.identity.rank)), None)

    def adopt(self, q: Quantity) -> bool:
        """Take over ``q``, a ``per_process`` quantity of a closing monitor of this (job, rank); False (it is
        not taken) when this monitor closed meanwhile or the hand-over failed (one warning)."""
        if self._closed:
            return False
        try:
            q.hand_over(self._ctx)
        except Exception as exc:
            warn_user(f"healthd: quantity {q.name!r} could not be handed to stream {self.stream!r} and stops: {exc!r}")
            return False
        self.quantities.append(q)
        return True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _batch_size(self, value: Any) -> int | None:
        if value is None:
            return None
        try:
            count = operator.index(value)
        except TypeError:
            count = -1
        if count >= 0:
            return count
        if not self._bad_batch_size_warned:
            self._bad_batch_size_warned = True
            warn_user(f"healthd: batch_size must be an int >= 0, got {value!r}; not reported")
        return None

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any, compiled: bool = False) -> None:
        if self._closed:
            return
        if compiled and not self._ctx.compiled_step:
            self._ctx.compiled_step = True
            logger.info("healthd: the optimizer step runs inside a torch.compile'd function")
        self._deliver_alerts()  # a TrainingStopped here comes before the update
        if not self._active:
            return
        with self._guard("optimizer step pre-hook"):
            if self._open is not None:  # the user did not call monitor.step() last time
                record, self._open = self._open, None
                self._finish(record)
            self._open = self._new_record()
            self._run("before_step", self._open)

    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any, compiled: bool = False) -> None:
        if not self._active or self._closed or self._open is None:
            return
        with self._guard("optimizer step post-hook"):
            self._run("after_step", self._open)

    # ------------------------------------------------------------------ records

    def _new_record(self) -> StepRecord:
        record = StepRecord(self._next_step, bool(self._model.training))
        self._next_step += 1
        return record

    def _run(self, method: str, record: StepRecord) -> None:
        self._ctx.record = record
        try:
            with torch.no_grad():
                for q in self.quantities:
                    if id(q) in self._disabled or not q.due(record.step):
                        continue
                    try:
                        if method == "on_step_end":
                            q.on_step_end(self._ctx, record)
                        else:
                            getattr(q, method)(self._ctx)
                    except Exception as exc:
                        self._disable(q, method, exc)
        finally:
            self._ctx.record = None

    def _finish(self, record: StepRecord) -> None:
        record.time = time.time()
        self._run("on_step_end", record)
        self._pending.append(PackedRecord(record))
        self._last_step = record.step
        self._poll()

    def _poll(self) -> None:
        while len(self._pending) > self.config.max_pending_records:
            self._pending.popleft()
            self.sender.count_dropped(1)
        while self._pending and self._pending[0].ready():
            report = self._step_report(self._pending.popleft())
            self.sender.enqueue(report)
            if self._actions.listening and _non_finite(report):
                self.sender.flush_soon()  # its alert comes back with the answer: do not wait the interval

    def _drain_pending(self, deadline: float) -> None:
        # Not Event.synchronize(): a hung device (a stuck collective) must not hang the exit.
        while self._pending:
            if self._pending[0].ready():
                self.sender.enqueue(self._step_report(self._pending.popleft()))
            elif time.monotonic() >= deadline:
                self.sender.count_dropped(len(self._pending))
                self._pending.clear()
            else:
                time.sleep(0.001)

    def _step_report(self, packed: PackedRecord) -> dict[str, Any]:
        record = packed.record
        report = self._base("step")
        report["time"] = record.time
        report["step"] = record.step
        if record.training is not None:
            report["training"] = record.training
        if record.batch_size is not None:
            report["batch_size"] = record.batch_size
        for q, values in packed.values().values():
            if id(q) in self._disabled:
                continue
            try:
                q.write(report, values)
            except Exception as exc:
                self._disable(q, "write", exc)
        if self.identity.rank >= self.config.layer_stats_ranks and "shard" not in report:
            # identical on every DDP rank: sent by the first ranks only (a shard's parts differ: all send)
            report.pop("layers", None)
        return report

    # ------------------------------------------------------------------ other reports

    def _base(self, kind: str) -> dict[str, Any]:
        base = {"kind": kind, "job": self.job, "rank": self.identity.rank, "time": time.time()}
        if self.stream is not None:  # absent for the unnamed stream: what a server without streams reads
            base["stream"] = self.stream
        return base

    def _send_attach_report(self, hints: dict[str, int | bool | str]) -> None:
        identity = self.identity
        report = self._base("attach")
        report.update(
            monitor_id=self.monitor_id,
            world_size=identity.world_size,
            local_rank=identity.local_rank,
            hostname=identity.hostname,
            run_id=identity.run_id,
            hints=hints,
            versions={
                "torch": str(torch.__version__)[:256],
                "python": platform.python_version(),
                "healthd_client": CLIENT_VERSION,
            },
            git_commit=git_commit(),
        )
        self._ctx.attach_report = report
        for q in self.quantities:
            try:
                q.on_attach(self._ctx)
            except Exception as exc:
                self._disable(q, "on_attach", exc)
        self.sender.enqueue(report)

    def _heartbeat(self, closing: bool) -> dict[str, Any]:
        report = self._base("heartbeat")
        sender = getattr(self, "sender", None)
        report.update(
            step=self._last_step,
            reports_dropped_total=sender.dropped_total if sender else 0,
            reports_sent_total=sender.sent_total if sender else 0,
            closing=closing,
        )
        if self._disabled or self._not_measured:  # healthd's MonitoringDegraded: which signals are blind
            report["disabled_quantities"] = [
                *({"name": name, "reason": self._disabled_why.get(key, "")[:256]}
                  for key, name in list(self._disabled.items())),
                *({"name": name, "reason": reason[:256]} for name, reason in self._not_measured.items())]
        return report

    # ------------------------------------------------------------------ alerts

    def _deliver_alerts(self) -> None:
        """Act on alerts the sender thread read from healthd's answers since the last call."""
        if not self._forked:
            self._actions.deliver(self.sender.alerts, self.sender.alerts_version)

    # ------------------------------------------------------------------ failures

    def _disable(self, q: Quantity, where: str, exc: Exception) -> None:
        if self._strict:
            raise exc
        self._disabled[id(q)] = q.name
        self._disabled_why[id(q)] = f"failed in {where}: {exc!r}"
        warn_user(f"healthd: quantity {q.name!r} failed in {where} and is disabled for this run: {exc!r}")
        with contextlib.suppress(Exception):
            q.close()

    def _degrade(self, q: Quantity, reason: str) -> None:
        """``q`` cannot measure in this job (not a failure): stop it, and say why in every heartbeat."""
        if id(q) in self._disabled:
            return
        self._disabled[id(q)] = q.name
        self._disabled_why[id(q)] = reason
        logger.info("healthd: quantity %r is not measured: %s", q.name, reason)
        with contextlib.suppress(Exception):
            q.close()

    @contextlib.contextmanager
    def _guard(self, where: str, disable: bool = True) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if self._strict:
                raise
            if disable:
                self._active = False
                self._open = None
                warn_user(f"healthd: monitor failed in {where}; it stops measuring (heartbeats go on): {exc!r}")
            else:
                warn_user(f"healthd: {where} failed and was not reported: {exc!r}")


def _outside_compiled(hook: Callable[[Any, Any, Any, bool], None]) -> Callable[[Any, Any, Any], None]:
    """An optimizer step hook that dynamo does not trace, told whether the step is being compiled.

    In a ``torch.compile``d training-step function dynamo inlines the optimizer's step hooks; traced,
    the monitor's bookkeeping (records, queues, weak maps) breaks the graph in many places and adds
    guards on its own state, which recompile the step. ``torch.compiler.disable`` makes dynamo call
    the hook as it is, in eager, between the graphs it builds around it (``Optimizer.step`` already
    breaks the graph on both sides of the update, so no graph is split). ``torch.compiler.is_compiling()``
    is evaluated in the traced wrapper and passed on as a constant: True only from compiled code.
    """
    eager = torch.compiler.disable(hook)

    def run(optimizer: Any, args: Any, kwargs: Any) -> None:
        eager(optimizer, args, kwargs, torch.compiler.is_compiling())

    return run


def _non_finite(report: dict[str, Any]) -> bool:
    """Whether a step report shows a NaN/Inf (what healthd's NonFiniteValues reads)."""
    counts = report.get("nonfinite")
    if isinstance(counts, dict) and any(counts.values()):
        return True
    return any(isinstance(v, float) and not math.isfinite(v) for v in (report.get("loss"), report.get("grad_norm")))


def _monitor_after_fork(ref: weakref.ref[Monitor]) -> None:
    monitor = ref()
    if monitor is not None:
        # A DataLoader worker must not measure, touch CUDA, or flush the parent's records.
        monitor._forked = True
        monitor._active = False
        monitor._pending = deque()
        monitor._open = None
