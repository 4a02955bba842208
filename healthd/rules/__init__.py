"""The rule catalog: one module per rule, named after the condition it detects.

``ALL_RULES`` is a plain tuple, not a registry: the engine is given the rule
classes it runs (``create_app`` passes these by default).
"""

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from healthd.rules.base import Finding, Rule, RuleConfig, Scope
from healthd.rules.batch_norm_small_batch import BatchNormSmallBatch
from healthd.rules.dead_activations import DeadActivations
from healthd.rules.dropout_before_batch_norm import DropoutBeforeBatchNorm
from healthd.rules.eval_mode_during_training import EvalModeDuringTraining
from healthd.rules.exploding_gradients import ExplodingGradients
from healthd.rules.gpu_hardware_errors import GPUHardwareErrors
from healthd.rules.gpu_imbalance import GPUImbalance
from healthd.rules.gpu_memory_leak import GPUMemoryLeak
from healthd.rules.gpu_memory_near_limit import GPUMemoryNearLimit
from healthd.rules.gpu_throttling import GPUThrottling
from healthd.rules.gradient_norm_mismatch import GradientNormMismatch
from healthd.rules.gradients_not_flowing import GradientsNotFlowing
from healthd.rules.initial_loss_unexpected import InitialLossUnexpected
from healthd.rules.input_not_normalized import InputNotNormalized
from healthd.rules.large_batch_generalization import LargeBatchGeneralization
from healthd.rules.learning_rate_not_scaled import LearningRateNotScaled
from healthd.rules.learning_rate_too_high import LearningRateTooHigh
from healthd.rules.learning_rate_too_low import LearningRateTooLow
from healthd.rules.loss_diverging import LossDiverging
from healthd.rules.loss_input_broadcast import LossInputBroadcast
from healthd.rules.loss_oscillating import LossOscillating
from healthd.rules.loss_plateau import LossPlateau
from healthd.rules.loss_scale_collapse import LossScaleCollapse
from healthd.rules.low_gpu_utilization import LowGPUUtilization
from healthd.rules.missing_zero_grad import MissingZeroGrad
from healthd.rules.monitoring_degraded import MonitoringDegraded
from healthd.rules.non_finite_values import NonFiniteValues
from healthd.rules.overfitting import Overfitting
from healthd.rules.rank_desync import RankDesync
from healthd.rules.rank_stalled import RankStalled
from healthd.rules.saturated_activations import SaturatedActivations
from healthd.rules.small_batch_underutilization import SmallBatchUnderutilization
from healthd.rules.softmax_before_loss import SoftmaxBeforeLoss
from healthd.rules.straggler_rank import StragglerRank
from healthd.rules.training_stalled import TrainingStalled
from healthd.rules.vanishing_gradients import VanishingGradients
from healthd.rules.weights_not_updating import WeightsNotUpdating
from healthd.settings import ConfigError, describe_error
from healthd.state.windows import JobWindow, RankWindow

ALL_RULES: tuple[type[Rule[Any, Any]], ...] = (
    NonFiniteValues,
    ExplodingGradients,
    VanishingGradients,
    LearningRateTooHigh,
    LearningRateTooLow,
    WeightsNotUpdating,
    LossDiverging,
    # distributed jobs
    LossScaleCollapse,
    StragglerRank,
    RankStalled,
    TrainingStalled,
    RankDesync,
    GradientNormMismatch,
    MonitoringDegraded,
    # the debugging checklists
    GradientsNotFlowing,
    MissingZeroGrad,
    EvalModeDuringTraining,
    SoftmaxBeforeLoss,
    LossInputBroadcast,
    InitialLossUnexpected,
    InputNotNormalized,
    DeadActivations,
    SaturatedActivations,
    DropoutBeforeBatchNorm,
    BatchNormSmallBatch,
    LossOscillating,
    LossPlateau,
    Overfitting,
    LargeBatchGeneralization,
    LearningRateNotScaled,
    # GPUs
    GPUHardwareErrors,
    GPUMemoryNearLimit,
    GPUMemoryLeak,
    GPUThrottling,
    LowGPUUtilization,
    SmallBatchUnderutilization,
    GPUImbalance,
)

__all__ = ["ALL_RULES", "Finding", "JobWindow", "RankWindow", "Rule", "RuleConfig", "Scope", "build_rules"]


def build_rules(rule_classes: Iterable[type[Rule[Any, Any]]],
                configs: Mapping[str, Mapping[str, Any]]) -> list[Rule[Any, Any]]:
    """Instantiate the enabled rules, validating each rule's config section."""
    classes = {cls.name: cls for cls in rule_classes}
    unknown = sorted(set(configs) - set(classes))
    if unknown:
        raise ConfigError(f"rules.{unknown[0]}: unknown rule; known rules: {', '.join(sorted(classes))}")
    rules: list[Rule[Any, Any]] = []
    for name, cls in classes.items():
        try:
            cfg = cls.Config.model_validate(dict(configs.get(name, {})))
        except ValidationError as e:
            raise ConfigError(describe_error(e, prefix=f"rules.{name}")) from None
        if cfg.enabled:
            rules.append(cls(cfg))
    return rules
