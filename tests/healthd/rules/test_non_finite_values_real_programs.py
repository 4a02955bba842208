"""After a NaN: NonFiniteValues' one critical finding, and no shape rule judging a window that straddles it."""

from __future__ import annotations

import math

import pytest

from healthd.rules.base import Rule
from healthd.rules.exploding_gradients import ExplodingGradients
from healthd.rules.learning_rate_too_high import LearningRateTooHigh
from healthd.rules.loss_diverging import LossDiverging
from healthd.rules.loss_oscillating import LossOscillating
from healthd.rules.loss_plateau import LossPlateau
from healthd.rules.non_finite_values import NonFiniteValues
from healthd.rules.softmax_before_loss import SoftmaxBeforeLoss
from healthd.rules.vanishing_gradients import VanishingGradients
from healthd.wire.records import StepRecord
from healthd.wire.schema import LossInputCheck, NonFinite, Severity
from tests.healthd.factories import step, steps, window

NAN = math.nan
SHAPE_RULES = [LossDiverging(), LossOscillating(), LossPlateau(), ExplodingGradients(), VanishingGradients(),
               LearningRateTooHigh()]


def _poisoned(start: int, n: int, **kw: object) -> list[StepRecord]:
    return [step(start + i, loss=NAN, grad_norm=NAN, nonfinite=NonFinite(loss=1, grads=3, params=3), **kw)
            for i in range(n)]


def _before_nan(kind: str) -> list[StepRecord]:
    """The run's last finite steps before the NaN, in shapes each rule would judge."""
    if kind == "climbing":
        return steps(40, loss=[0.5] * 30 + [0.5 * 2**i for i in range(10)], grad_norm=[1.0] * 30 + [2.0**i
                     for i in range(10)], lr=[0.1])
    if kind == "flat":
        return steps(60, loss=[2.3 + 0.01 * (i % 2) for i in range(60)], grad_norm=1.0, lr=[0.1])
    return steps(60, loss=[2.0 if i % 2 else 0.5 for i in range(60)], grad_norm=1e-9, lr=[0.1])  # zig-zag, tiny grads


@pytest.mark.parametrize("kind", ["climbing", "flat", "zigzag"])
@pytest.mark.parametrize("rule", SHAPE_RULES, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("after", [1, 5, 24])
def test_shape_rules_are_silent_after_the_nan(rule: Rule, kind: str, after: int) -> None:
    run = [*_before_nan(kind)]
    run += _poisoned(len(run), after)
    assert rule.evaluate(window(run)) is None


def test_non_finite_values_is_the_one_critical_finding() -> None:
    run = [*_before_nan("climbing")]
    run += _poisoned(len(run), 1)
    f = NonFiniteValues().evaluate(window(run))
    assert f is not None and f.step == 40 and NonFiniteValues.severity is Severity.CRITICAL


def _nll(**kw: object) -> LossInputCheck:
    return LossInputCheck(fn="nll_loss", input_shape=[8, 10], target_shape=[8], **kw)


@pytest.mark.parametrize("later", [0, 24, 49])
def test_softmax_before_loss_ignores_nan_log_probabilities(later: int) -> None:
    # NaN log-probabilities fail both checks (not all <= 0, rows do not normalise): the NaN's doing
    run = [*steps(30, loss=0.5, grad_norm=1.0, loss_inputs=[[_nll(all_non_positive=True, rows_sum_to_one=True)]] * 30)]
    run += _poisoned(30, 1 + later, loss_inputs=[_nll()])
    assert SoftmaxBeforeLoss().evaluate(window(run)) is None


def test_softmax_before_loss_waits_a_lookback_after_a_transient_nan() -> None:
    wrong = [_nll(all_non_positive=True)]  # log-probabilities over the wrong dim: a real fault
    run = [*steps(30, loss=0.5, grad_norm=1.0), *_poisoned(30, 1)]
    run += steps(10, start=31, loss=0.5, grad_norm=1.0, loss_inputs=[wrong] * 10)
    assert SoftmaxBeforeLoss().evaluate(window(run)) is None  # the NaN is within the lookback
    run += steps(50, start=41, loss=0.5, grad_norm=1.0, loss_inputs=[wrong] * 50)
    f = SoftmaxBeforeLoss().evaluate(window(run))
    assert f is not None and f.severity is Severity.WARNING


def test_amp_skipped_steps_do_not_reset_the_windows() -> None:
    # a GradScaler skip (inf grads, finite loss, step_skipped) is not poison: a plateau is still seen
    run = steps(60, loss=[2.3 + 0.01 * (i % 2) for i in range(60)], grad_norm=1.0)
    run[45] = step(45, loss=2.3, grad_norm=math.inf, nonfinite=NonFinite(grads=2), step_skipped=True)
    assert LossPlateau().evaluate(window(run)) is not None
