"""``attach()``: resolves its arguments (environment defaults, validation) and builds a ``Monitor``.

Attaching twice to the same optimizer returns the monitor already attached (with a warning) rather
than replacing it: two monitors would double the hooks, and replacing would silently drop the first
one's unsent records (``healthd_client.monitor.attached`` is the registry). The exception is a monitor
that auto-attach made (``yielding``): an explicit attach replaces it silently, since the script's own
arguments (job, hints, config) say more than the environment.

Several models and optimizers in one process (a GAN's generator and discriminator, actor and critic)
are one monitor each, and each names its stream (``stream="generator"``): healthd keeps windows per
(job, rank, stream). A second open monitor for the same (job, rank, stream) would interleave its steps
with the first's in one window; attach() refuses it with a ``ValueError`` that says to pass ``stream``.
The GPU is the process's, not a stream's: only the first open monitor of a (job, rank) samples it
(``_per_process_quantities``), so its series and GPU alerts exist once, under that monitor's stream.
When that monitor closes while another stream's stays open, the running sampler is handed to that one
(``Monitor.adopt``): the series go on under its stream without a gap, from the same one sampler.
"""

from __future__ import annotations

import os
import re
import sys
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import torch

from healthd_client.alerts import ALERT_NAME, FiringAlert
from healthd_client.config import MonitorConfig
from healthd_client.identity import detect_identity
from healthd_client.monitor import Monitor, attached, warn_user
from healthd_client.quantities import default_quantities
from healthd_client.quantities.base import Quantity
from healthd_client.transport import HttpTransport, Transport

if TYPE_CHECKING:
    from healthd_client.integrations.deepspeed import ZeroJob

# Monitors made by healthd_client.auto: an explicit attach() on their optimizer closes and replaces them.
yielding: weakref.WeakSet[Monitor] = weakref.WeakSet()

_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+\-]*$")  # healthd.wire.schema.JobName
STREAM_NAME = re.compile(r"^[a-z0-9_.\-]{1,32}$")  # healthd.wire.schema.STREAM_PATTERN
LOSS_KINDS = ("minimized", "adversarial")  # healthd.wire.schema.Hints.loss_kind


def _optional_count(name: str, value: Any, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_optimizer(optimizer: Any) -> None:
    """The monitor measures around ``optimizer.step()`` through its step hooks; refuse what has none.

    A manual update loop (``p -= lr * p.grad``) or an optimizer class of its own that does not
    derive from ``torch.optim.Optimizer`` has no ``register_step_pre_hook``: without it the
    monitor would see no step at all, or fail later inside the training loop.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return
    kind = "None" if optimizer is None else type(optimizer).__name__
    raise ValueError(
        f"optimizer must be a torch.optim.Optimizer (healthd measures around optimizer.step() through "
        f"register_step_pre_hook/register_step_post_hook), got {kind}. For a manual update loop or an "
        f"optimizer class of your own, derive it from torch.optim.Optimizer: "
        f"class MyOpt(torch.optim.Optimizer): __init__ calls super().__init__(params, defaults) and step() "
        f"does the update over self.param_groups; then pass MyOpt(model.parameters(), ...) to attach()"
    )


def _zero_job(model: Any, optimizer: Any) -> ZeroJob | None:
    """A DeepSpeed ZeRO engine and its optimizer, resolved (see ``integrations.deepspeed``); None otherwise."""
    if "deepspeed" not in sys.modules:  # not imported: the model cannot be one of its engines
        return None
    from healthd_client.integrations.deepspeed import deepspeed_engine, zero_job
    engine = deepspeed_engine(model)
    return None if engine is None else zero_job(engine, optimizer)


def _check_alert_args(on_alert: Any, stop_on: Any, on_stop: Any) -> tuple[str, ...]:
    """Validate attach()'s alert arguments; returns ``stop_on`` as a tuple of rule names."""
    for name, fn in (("on_alert", on_alert), ("on_stop", on_stop)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name} must be a callable taking a FiringAlert, got {type(fn).__name__}")
    if isinstance(stop_on, str) or not isinstance(stop_on, Collection):
        raise ValueError(f'stop_on must be a tuple of alert names, e.g. ("NonFiniteValues",), got {stop_on!r}')
    names = tuple(stop_on)
    bad = [n for n in names if not isinstance(n, str) or not ALERT_NAME.match(n)]
    if bad:
        raise ValueError(f'stop_on must hold alert names such as "NonFiniteValues", got {bad[0]!r}')
    if on_stop is not None and not names:
        raise ValueError("on_stop is called when a stop_on alert fires: give stop_on too")
    return names


def _check_stream(stream: Any, loss_kind: Any) -> None:
    if stream is not None and (not isinstance(stream, str) or not STREAM_NAME.fullmatch(stream)):
        raise ValueError(f'stream must be None or 1-32 chars of [a-z0-9_.-], e.g. "generator", got {stream!r}')
    if loss_kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {', '.join(map(repr, LOSS_KINDS))}, got {loss_kind!r}")


def _claim(job: str, rank: int, stream: str | None) -> None:
    """Refuse a second open monitor of one (job, rank, stream) in this process; an auto-attached one yields."""
    for other in list(attached.values()):
        if other.closed or (other.job, other.identity.rank, other.stream) != (job, rank, stream):
            continue
        if other in yielding:
            other.close()
            continue
        named = "the unnamed stream" if stream is None else f"stream {stream!r}"
        raise ValueError(
            f"healthd: another monitor is already attached for job {job!r}, rank {rank}, {named}: two monitors "
            f"reporting the same (job, rank, stream) would interleave their steps in one window. Give each "
            f'model/optimizer its own stream, e.g. attach(generator, opt_g, job, stream="generator") and '
            f'attach(discriminator, opt_d, job, stream="discriminator")')


def _per_process_quantities(job: str, rank: int, quantities: list[Quantity]) -> list[Quantity]:
    """``quantities`` without the ``per_process`` ones (the GPU sampler) that another open monitor of this
    (job, rank) in this process already runs: each stream's sampler would report the same device again,
    doubling its series and firing every GPU rule once per stream."""
    running = {q.name for m in list(attached.values()) if not m.closed and (m.job, m.identity.rank) == (job, rank)
               for q in m.quantities if q.per_process}
    return [q for q in quantities if not (q.per_process and q.name in running)]


def looks_pretrained(model: torch.nn.Module) -> bool:
    """Whether ``model`` shows that it starts from pretrained weights: a peft wrapper (LoRA and
    friends only ever wrap a pretrained model), or a Hugging Face model loaded by name
    (``from_pretrained`` sets ``config.name_or_path``; a model built from a config leaves it empty)."""
    module: Any = model
    for _ in range(8):  # DDP / torch.compile / peft wrappers, outermost first
        if type(module).__module__.split(".")[0] == "peft" or hasattr(module, "peft_config"):
            return True
        name = getattr(getattr(module, "config", None), "name_or_path", None)
        if isinstance(name, str) and name:
            return True
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        module = inner
    return False


def attach(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    job: str | None = None,
    server: str | None = None,
    *,
    token: str | None = None,
    dataset_size: int | None = None,
    num_classes: int | None = None,
    grad_accumulation_steps: int = 1,
    fine_tune: bool | None = None,
    stream: str | None = None,
    loss_kind: str = "minimized",
    rank: int | None = None,
    world_size: int | None = None,
    config: MonitorConfig | None = None,
    transport: Transport | None = None,
    extra_quantities: Sequence[Quantity] = (),
    strict: bool = False,
    on_alert: Callable[[FiringAlert], object] | None = None,
    stop_on: Collection[str] = (),
    on_stop: Callable[[FiringAlert], object] | None = None,
) -> Monitor:
    """See ``healthd_client.attach``."""
    stop_names = _check_alert_args(on_alert, stop_on, on_stop)
    config = MonitorConfig() if config is None else config
    if not isinstance(config, MonitorConfig):
        raise ValueError(f"config must be a MonitorConfig, got {type(config).__name__}")
    zero = _zero_job(model, optimizer)
    if zero is None:
        _check_optimizer(optimizer)
    existing = attached.get(optimizer)
    if existing is not None and existing in yielding:
        existing.close()
        existing = None
    if existing is not None and not existing.closed:
        warn_user(
            "healthd: this optimizer already has a monitor attached; returning it "
            "(the arguments of this second attach() are ignored; close() it first to re-attach)"
        )
        return existing
    job = job if job is not None else os.environ.get("HEALTHD_JOB")
    if not job or len(job) > 128 or not _JOB_NAME.match(job):
        raise ValueError(
            f"job must be 1-128 chars of [A-Za-z0-9_.:/@+-] starting with a letter or digit "
            f"(argument or HEALTHD_JOB), got {job!r}"
        )
    if zero is not None:
        model = zero.module
    if fine_tune is not None and not isinstance(fine_tune, bool):
        raise ValueError(f"fine_tune must be True, False or None, got {fine_tune!r}")
    _check_stream(stream, loss_kind)
    hints: dict[str, int | bool | str | None] = {
        "fine_tune": looks_pretrained(model) if fine_tune is None else fine_tune,
        "dataset_size": _optional_count("dataset_size", dataset_size),
        "num_classes": _optional_count("num_classes", num_classes),
        "grad_accumulation_steps": _optional_count("grad_accumulation_steps", grad_accumulation_steps, 1),
        "loss_kind": None if loss_kind == "minimized" else loss_kind,  # the default is not sent (older servers)
    }
    identity = detect_identity(rank, world_size)
    _claim(job, identity.rank, stream)
    if transport is None:
        server = server if server is not None else os.environ.get("HEALTHD_SERVER")
        if not server:
            raise ValueError("server must be given (argument or HEALTHD_SERVER), e.g. http://127.0.0.1:8000")
        transport = HttpTransport(server, config.request_timeout_seconds)
    if token is None:
        token = os.environ.get("HEALTHD_TOKEN") or None
    # An extra quantity replaces the built-in one of the same name (e.g. a GpuMonitor with a test NVML).
    quantities = [*(q for q in default_quantities(config) if q.name not in {e.name for e in extra_quantities}),
                  *extra_quantities]
    if zero is not None:
        from healthd_client.integrations.deepspeed import NOT_MEASURED, EngineStepped, zero_quantities
        quantities = zero_quantities(zero, quantities, config.heavy_every_steps, config.update_sample_per_tensor)
    monitor = Monitor(
        model,
        optimizer if zero is None else zero.optimizer,
        job=job,
        stream=stream,
        identity=identity,
        transport=transport,
        token=token,
        config=config,
        hints={k: v for k, v in hints.items() if v is not None},
        quantities=_per_process_quantities(job, identity.rank, quantities),
        strict=strict,
        on_alert=on_alert,
        stop_on=stop_names,
        on_stop=on_stop,
        step_hooks=zero is None,
        not_measured=None if zero is None else NOT_MEASURED,
        stepped=None if zero is None else EngineStepped(zero.engine),
    )
    attached[optimizer] = monitor
    return monitor

