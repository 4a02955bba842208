"""healthd_client: report a PyTorch job's training health to healthd.

Usage::

    import healthd_client
    monitor = healthd_client.attach(model, optimizer, job="resnet-run-7", server="http://127.0.0.1:8000")
    for x, y in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        monitor.step(loss=loss, batch_size=len(x))
    monitor.close()

To act on what healthd finds, inside the training process (off by default)::

    monitor = healthd_client.attach(model, optimizer, job="resnet-run-7", server=...,
                                    stop_on=("NonFiniteValues",), on_stop=lambda alert: save_checkpoint())
    # the step after healthd reports a NaN raises healthd_client.TrainingStopped

Importing this package imports neither torch nor any server dependency; torch
is imported by ``attach``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from healthd_client.alerts import FiringAlert, TrainingStopped
from healthd_client.config import MonitorConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Sequence

    import torch

    from healthd_client.monitor import Monitor
    from healthd_client.quantities.base import Quantity
    from healthd_client.transport import Transport

__version__ = "0.1.0"
__all__ = ["FiringAlert", "Monitor", "MonitorConfig", "Quantity", "TrainingStopped", "attach"]


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
    """Hook ``optimizer`` (and inspect ``model``); return the Monitor that reports to healthd.

    ``job`` defaults to $HEALTHD_JOB, ``server`` to $HEALTHD_SERVER (not needed
    when ``transport`` is given), ``token`` to $HEALTHD_TOKEN (sent as a Bearer
    token). ``dataset_size``, ``num_classes`` and ``grad_accumulation_steps`` are
    sent as hints, and so is ``fine_tune`` (the job starts from pretrained weights; when
    None, it is inferred: a peft wrapper or a Hugging Face model loaded by name; weights
    from a plain ``load_state_dict`` leave no trace, and healthd then reads a step-0 loss
    below 2/3 of chance ln(C) as the sign of trained weights).
    ``stream`` names this monitor's stream when one process trains several models or
    optimizers (a GAN: ``stream="generator"`` and ``stream="discriminator"``, one attach
    each, same job): healthd keeps windows and alerts per (job, rank, stream), and a second
    open monitor of the same (job, rank, stream) raises ``ValueError``. ``loss_kind="adversarial"``
    says the stream's loss is not driven down (a GAN player's): healthd's loss-shape rules
    (plateau, divergence, oscillation, initial loss) leave it alone.
    ``rank``/``world_size`` override torch.distributed and the
    RANK/WORLD_SIZE environment. ``extra_quantities`` are measured in addition
    to the built-in ones. ``strict=True`` lets exceptions inside measurements
    propagate (for tests); by default they disable the failing measurement with
    one warning. Invalid arguments raise ``ValueError``; so does an ``optimizer`` that is
    not a ``torch.optim.Optimizer`` (a manual update loop or an optimizer class of your
    own: derive it from ``torch.optim.Optimizer``, whose step hooks healthd uses, and
    put the update in its ``step()``). Attaching to an
    optimizer that already has an open monitor warns and returns that monitor.

    DeepSpeed ZeRO (stages 1-3): ``attach(engine, engine.optimizer)`` with the engine from
    ``deepspeed.initialize``; call ``monitor.step(loss=...)`` after ``engine.step()``, where
    everything is measured (see ``healthd_client.integrations.deepspeed`` for what and what not).

    Alerts (off by default; nothing ever waits for healthd): ``monitor.alerts`` is what
    healthd's latest answer to a report push said fires for this job. ``on_alert(alert)``
    is called with each newly firing ``FiringAlert``, on the training thread, at the next
    ``monitor.step()`` or ``optimizer.step()``. ``stop_on`` names alerts (e.g.
    ``("NonFiniteValues",)``) that stop the run there: ``on_stop(alert)`` is called (save a
    checkpoint), then ``TrainingStopped`` is raised, naming the alert and its evidence (the
    Lightning and transformers callbacks set ``should_stop`` / ``should_training_stop`` instead).
    """
    from healthd_client.attachment import attach as _attach

    return _attach(
        model,
        optimizer,
        job,
        server,
        token=token,
        dataset_size=dataset_size,
        num_classes=num_classes,
        grad_accumulation_steps=grad_accumulation_steps,
        fine_tune=fine_tune,
        stream=stream,
        loss_kind=loss_kind,
        rank=rank,
        world_size=world_size,
        config=config,
        transport=transport,
        extra_quantities=extra_quantities,
        strict=strict,
        on_alert=on_alert,
        stop_on=stop_on,
        on_stop=on_stop,
    )


def __getattr__(name: str) -> Any:
    # Lazy: these modules import torch.
    if name == "Monitor":
        from healthd_client.monitor import Monitor

        return Monitor
    if name == "Quantity":
        from healthd_client.quantities.base import Quantity

        return Quantity
    raise AttributeError(f"module 'healthd_client' has no attribute {name!r}")
