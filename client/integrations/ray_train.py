"""Ray Train: attach inside a ``TorchTrainer``'s ``train_func`` with one line.

Usage (inside ``train_func``, after ``ray.train.torch.prepare_model``)::

    from healthd_client.integrations import ray_train as healthd_ray

    monitor = healthd_ray.attach(model, optimizer)
    ...
        monitor.step(loss=loss, batch_size=len(x))
    monitor.close()  # Ray ends workers without running atexit handlers

Rank, local rank, world size and node rank come from ``ray.train.get_context()``
(Ray 2.60 runs Train V2, where ``get_trial_name()`` raises, so it is not used);
the run id and, unless given, the job name are the experiment name
(``RunConfig(name=...)``). The server is ``server=`` or $HEALTHD_SERVER, which
reaches the workers through ``RunConfig``/``ray.init(runtime_env={"env_vars":
{"HEALTHD_SERVER": ...}})`` or the ``train_loop_config``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from healthd_client.monitor import Monitor

_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_.:/@+\-]")


def job_name(experiment: str) -> str:
    """An experiment name mapped onto healthd's job-name alphabet."""
    name = _NOT_ALLOWED.sub("-", experiment).lstrip("_.:/@+-")[:128]
    return name or "ray-train"


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, job: str | None = None,
           server: str | None = None, **kwargs: Any) -> Monitor:
    """``healthd_client.attach`` for a Ray Train worker; raises ``RuntimeError`` outside one."""
    import os

    import ray.train  # also what lets healthd_client.identity see the Ray Train context

    try:
        ctx = ray.train.get_context()
        experiment = str(ctx.get_experiment_name())
        ctx.get_world_rank()
    except Exception as exc:
        raise RuntimeError("healthd_client.integrations.ray_train.attach must run inside a Ray Train "
                           "train_func (ray.train.get_context() failed)") from exc
    import healthd_client

    if job is None:
        job = os.environ.get("HEALTHD_JOB") or job_name(experiment)
    return healthd_client.attach(model, optimizer, job, server, **kwargs)
