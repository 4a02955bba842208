"""The rule catalog: one module per rule, named after the condition it detects.

``ALL_RULES`` is a plain tuple, not a registry: the engine is given the rule
classes it runs (``create_app`` passes these by default).
"""

from healthd.rules.base import Finding, JobWindow, RankWindow, Rule, RuleConfig, Scope
from healthd.rules.exploding_gradients import ExplodingGradients
from healthd.rules.gradient_norm_mismatch import GradientNormMismatch
from healthd.rules.learning_rate_too_high import LearningRateTooHigh
from healthd.rules.learning_rate_too_low import LearningRateTooLow
from healthd.rules.loss_diverging import LossDiverging
from healthd.rules.loss_scale_collapse import LossScaleCollapse
from healthd.rules.non_finite_values import NonFiniteValues
from healthd.rules.rank_desync import RankDesync
from healthd.rules.rank_stalled import RankStalled
from healthd.rules.straggler_rank import StragglerRank
from healthd.rules.training_stalled import TrainingStalled
from healthd.rules.vanishing_gradients import VanishingGradients
from healthd.rules.weights_not_updating import WeightsNotUpdating

ALL_RULES: tuple[type[Rule], ...] = (
    NonFiniteValues,
    ExplodingGradients,
    VanishingGradients,
    LearningRateTooHigh,
    LearningRateTooLow,
    WeightsNotUpdating,
    LossDiverging,
    # distributed jobs (issue 4)
    LossScaleCollapse,
    StragglerRank,
    RankStalled,
    TrainingStalled,
    RankDesync,
    GradientNormMismatch,
)

__all__ = ["ALL_RULES", "Finding", "JobWindow", "RankWindow", "Rule", "RuleConfig", "Scope"]
