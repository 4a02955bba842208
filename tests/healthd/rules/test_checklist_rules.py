"""Table tests of the checklist rules: plain series in, findings out."""

from __future__ import annotations

import math

import pytest

from healthd.rules.batch_norm_small_batch import BatchNormSmallBatch
from healthd.rules.dead_activations import DeadActivations
from healthd.rules.dropout_before_batch_norm import DropoutBeforeBatchNorm
from healthd.rules.eval_mode_during_training import EvalModeDuringTraining
from healthd.rules.gradients_not_flowing import GradientsNotFlowing
from healthd.rules.initial_loss_unexpected import InitialLossUnexpected
from healthd.rules.input_not_normalized import InputNotNormalized
from healthd.rules.large_batch_generalization import LargeBatchGeneralization
from healthd.rules.learning_rate_not_scaled import LearningRateNotScaled
from healthd.rules.loss_input_broadcast import LossInputBroadcast
from healthd.rules.loss_oscillating import LossOscillating
from healthd.rules.loss_plateau import LossPlateau
from healthd.rules.missing_zero_grad import MissingZeroGrad
from healthd.rules.overfitting import Overfitting
from healthd.rules.saturated_activations import SaturatedActivations
from healthd.rules.softmax_before_loss import SoftmaxBeforeLoss
from healthd.wire.schema import (
    ActivationStats,
    AttachReport,
    EvalReport,
    Hints,
    InputStats,
    LossInputCheck,
    Severity,
    StaticFinding,
)
from tests.healthd.factories import step, steps, window


def attach(**kw: object) -> AttachReport:
    return AttachReport(job="j", time=1.0, **kw)  # type: ignore[arg-type]


def ce(**kw: object) -> LossInputCheck:
    return LossInputCheck(fn=kw.pop("fn", "cross_entropy"), input_shape=[8, 10], target_shape=[8], **kw)  # type: ignore[arg-type]


def fires(rule: object, w: object) -> Severity | None | bool:
    f = rule.evaluate(w)  # type: ignore[attr-defined]
    return False if f is None else (f.severity or rule.severity)  # type: ignore[attr-defined]


OK = {"grad_norm": 1.0}
GONE = {"grad_missing": True}
ZERO = {"grad_norm": 0.0}
noisy = [2.0 + 0.05 * math.sin(i * 1.7) for i in range(40)]
falling = [2.0 * 0.97 ** i + 0.02 * math.sin(i * 1.7) for i in range(40)]


CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (GradientsNotFlowing(), window(steps(3, layers=[{"a": OK, "b": GONE}] * 3)), Severity.WARNING),
    (GradientsNotFlowing(), window(steps(3, layers=[{"a": OK, "b": ZERO}] * 3)), Severity.WARNING),
    (GradientsNotFlowing(), window(steps(3, layers=[{"a": OK, "b": GONE}, {"a": OK, "b": OK}, {"a": OK, "b": GONE}])),
     False),
    (GradientsNotFlowing(), window(steps(3, layers=[{"a": GONE, "b": GONE}] * 3)), False),  # WeightsNotUpdating's
    (MissingZeroGrad(), window(steps(3, grads_stale_at_backward=True)), Severity.CRITICAL),
    (MissingZeroGrad(), window(steps(3, grads_stale_at_backward=[True, False, True])), False),
    (EvalModeDuringTraining(), window(steps(4, training=[True, True, False, False])), Severity.WARNING),
    (EvalModeDuringTraining(), window(steps(4, training=[True, True, True, False])), False),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(rows_sum_to_one=True, all_non_negative=True)])]),
     Severity.WARNING),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(all_non_negative=True)])]), Severity.WARNING),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce()])]), False),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(fn="nll_loss", all_non_positive=True,
                                                         rows_sum_to_one=True)])]), False),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(fn="nll_loss", all_non_positive=True)])]), Severity.WARNING),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(fn="nll_loss", all_non_negative=True)])]), Severity.WARNING),
    (LossInputBroadcast(), window([step(0, loss_inputs=[LossInputCheck(fn="mse_loss", input_shape=[8, 1],
                                                                       target_shape=[8], broadcasts=True)])]),
     Severity.CRITICAL),
    (LossInputBroadcast(), window([step(0, loss_inputs=[LossInputCheck(fn="mse_loss", input_shape=[8],
                                                                       target_shape=[8])])]), False),
    (InitialLossUnexpected(), window(steps(3, loss=12.0), attach(hints=Hints(num_classes=10))), Severity.WARNING),
    (InitialLossUnexpected(), window(steps(3, loss=3.9), attach(hints=Hints(num_classes=10))), Severity.INFO),
    (InitialLossUnexpected(), window(steps(3, loss=2.35), attach(hints=Hints(num_classes=10))), False),
    (InitialLossUnexpected(), window(steps(3, loss=12.0, loss_inputs=[[ce()]] * 3)), Severity.WARNING),  # C from shape
    (InitialLossUnexpected(), window(steps(3, loss=12.0)), False),  # no class count: not a classifier
    (InputNotNormalized(), window([step(0, inputs=InputStats(mean=4.9, std=6.0, abs_max=16))]), Severity.WARNING),
    (InputNotNormalized(), window([step(0, inputs=InputStats(mean=0.3, std=0.35, abs_max=1))]), Severity.INFO),
    (InputNotNormalized(), window([step(0, inputs=InputStats(mean=0.01, std=0.98, abs_max=5))]), False),
    (DeadActivations(), window([step(0, activations={"1": ActivationStats(kind="relu", dead_fraction=0.95)})]),
     Severity.CRITICAL),
    (DeadActivations(), window([step(0, activations={"1": ActivationStats(kind="relu", dead_fraction=0.6)}),
                                step(10, activations={"1": ActivationStats(kind="relu", dead_fraction=0.2)})]), False),
    (SaturatedActivations(), window([step(0, activations={"1": ActivationStats(kind="tanh", saturated_fraction=0.7)})]),
     Severity.WARNING),
    (SaturatedActivations(), window([step(0, activations={"1": ActivationStats(kind="relu", dead_fraction=0.7)})]),
     False),
    (DropoutBeforeBatchNorm(), window([step(0)], attach(static_findings=[
        StaticFinding(check="dropout_before_batchnorm", layer="2")])), Severity.WARNING),
    (DropoutBeforeBatchNorm(), window([step(0)], attach(static_findings=[StaticFinding(check="batchnorm", layer="1")])),
     False),
    (BatchNormSmallBatch(), window(steps(5, batch_size=4), attach(static_findings=[
        StaticFinding(check="batchnorm", layer="1")])), Severity.WARNING),
    (BatchNormSmallBatch(), window(steps(5, batch_size=1), attach(static_findings=[
        StaticFinding(check="batchnorm", layer="1")])), Severity.CRITICAL),
    (BatchNormSmallBatch(), window(steps(5, batch_size=12), attach(world_size=4, static_findings=[
        StaticFinding(check="batchnorm", layer="1")])), Severity.INFO),
    (BatchNormSmallBatch(), window(steps(5, batch_size=4)), False),  # no batch norm
    (LossOscillating(), window(steps(30, loss=[2.0 if i % 2 else 0.4 for i in range(30)])), Severity.WARNING),
    (LossOscillating(), window(steps(30, loss=falling[:30])), False),
    (LossPlateau(), window(steps(40, loss=noisy)), Severity.WARNING),
    (LossPlateau(), window(steps(40, loss=falling)), False),
    (LargeBatchGeneralization(), window(steps(3, batch_size=512), attach(hints=Hints(dataset_size=1400))),
     Severity.WARNING),
    (LargeBatchGeneralization(), window(steps(3, batch_size=100), attach(hints=Hints(dataset_size=1400))),
     Severity.INFO),
    (LargeBatchGeneralization(), window(steps(3, batch_size=32), attach(hints=Hints(dataset_size=1400))), False),
    (LearningRateNotScaled(), window(steps(10, batch_size=[32] * 6 + [256] * 4, lr=[0.1])), Severity.WARNING),
    (LearningRateNotScaled(), window(steps(10, batch_size=[32] * 6 + [256] * 4,
                                           lr=[[0.1]] * 6 + [[0.8]] * 4)), False),  # linear scaling
    (LearningRateNotScaled(), window(steps(10, batch_size=[32] * 9 + [7], lr=[0.1])), False),  # short last batch
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected


def _evals(losses: list[float]) -> list[EvalReport]:
    return [EvalReport(job="j", time=1.0, step=10 * (i + 1) - 1, loss=v) for i, v in enumerate(losses)]


@pytest.mark.parametrize(("val", "expected"), [
    ([1.0, 0.8, 0.9, 1.1], Severity.WARNING),  # rises 10%+ above its best for two passes while train falls
    ([1.0, 0.8, 0.7, 0.65], Severity.INFO),  # improving, but the gap to train grows: unsure, so info
    ([1.0, 0.8, 0.95, 0.7], Severity.INFO),  # one bad pass is not a rise
    ([0.86, 0.65, 0.44, 0.23], False),  # val tracks train within 5%
])
def test_overfitting(val: list[float], expected: object) -> None:
    train = [1.0 - 0.02 * i for i in range(40)]
    w = window(steps(40, loss=train), evals=_evals(val))
    assert fires(Overfitting(), w) == expected
