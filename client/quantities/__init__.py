"""Measurements, one per module; ``default_quantities`` is the set ``attach`` uses.

To add a measurement: write a ``Quantity`` subclass in a new module here (see
``base``), then either append it in ``default_quantities`` or pass it to
``attach(..., extra_quantities=[...])``. The monitor needs no change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from healthd_client.config import MonitorConfig
    from healthd_client.quantities.base import Quantity


def default_quantities(config: MonitorConfig) -> list[Quantity]:
    """The built-in quantities, scheduled by ``config``."""
    from healthd_client.integrations.ddp import DDPGradientNoise
    from healthd_client.quantities.activations import Activations
    from healthd_client.quantities.gpu import GpuMonitor
    from healthd_client.quantities.grad_norm import GradNorm
    from healthd_client.quantities.inputs import Inputs
    from healthd_client.quantities.loss import Loss
    from healthd_client.quantities.loss_inputs import LossInputs
    from healthd_client.quantities.lr import LearningRate
    from healthd_client.quantities.model_summary import ModelSummary
    from healthd_client.quantities.non_finite import NonFiniteParams
    from healthd_client.quantities.optimizer_summary import OptimizerSummary
    from healthd_client.quantities.param_fingerprint import ParamFingerprint
    from healthd_client.quantities.stale_grads import StaleGrads
    from healthd_client.quantities.static_checks import StaticChecks
    from healthd_client.quantities.step_time import StepTime
    from healthd_client.quantities.update_ratio import UpdateRatio

    return [
        ModelSummary(),
        OptimizerSummary(),
        Loss(every_steps=1),
        LearningRate(every_steps=1),
        StepTime(),
        GradNorm(every_steps=config.grad_norm_every_steps),
        UpdateRatio(every_steps=config.heavy_every_steps, sample_per_tensor=config.update_sample_per_tensor),
        NonFiniteParams(every_steps=config.heavy_every_steps),
        # the debugging checklists: sampled on the heavy schedule, plus two cheap always-on checks
        StaticChecks(),
        StaleGrads(),
        Activations(sample_every_steps=config.inspect_every_steps, first_steps=config.inspect_first_steps),
        Inputs(sample_every_steps=config.inspect_every_steps, first_steps=config.inspect_first_steps),
        LossInputs(sample_every_steps=config.inspect_every_steps, first_steps=config.inspect_first_steps),
        GpuMonitor(sample_seconds=config.gpu_sample_seconds),
        # Distributed jobs: both turn themselves off in a single process / without DDP.
        DDPGradientNoise(),
        ParamFingerprint(every_steps=config.fingerprint_every_steps),
    ]
