"""Table tests for the foundation rules: plain series in, findings out."""

from __future__ import annotations

import math

import pytest

from healthd.rules.exploding_gradients import ExplodingGradients
from healthd.rules.learning_rate_too_high import LearningRateTooHigh
from healthd.rules.learning_rate_too_low import LearningRateTooLow
from healthd.rules.loss_diverging import LossDiverging
from healthd.rules.non_finite_values import NonFiniteValues
from healthd.rules.vanishing_gradients import VanishingGradients
from healthd.rules.weights_not_updating import WeightsNotUpdating
from healthd.wire.schema import AttachReport, LayerInfo, ModelSummary, NonFinite, Severity
from tests.healthd.factories import step, steps, window

NAN, INF = math.nan, math.inf
healthy_loss = [2.3 * 0.99**i for i in range(60)]


def _attach(layers: list[tuple[str, str, int]]) -> AttachReport:
    return AttachReport(job="j", time=1.0, model=ModelSummary(
        param_count=sum(p for *_, p in layers), trainable_count=sum(p for *_, p in layers),
        layers=[LayerInfo(name=n, module_type=t, params=p) for n, t, p in layers]))


# ---------------------------------------------------------------- NonFiniteValues
@pytest.mark.parametrize(
    ("last", "fires"),
    [
        (dict(loss=NAN, nonfinite=NonFinite(loss=1)), True),
        (dict(loss=1.0, grad_norm=INF, nonfinite=NonFinite(grads=2)), True),
        (dict(loss=1.0, nonfinite=NonFinite(params=1)), True),
        (dict(loss=1.0, grad_norm=1.0), False),
        # GradScaler skipped a step with inf grads: its job, not a finding.
        (dict(loss=1.0, grad_norm=INF, nonfinite=NonFinite(grads=1), step_skipped=True), False),
    ],
)
def test_non_finite(last: dict, fires: bool) -> None:
    w = window([*steps(5, loss=1.0, grad_norm=1.0), step(5, **last)])
    f = NonFiniteValues().evaluate(w)
    assert (f is not None) is fires
    if f:
        assert f.step == 5 and f.rank == 0 and "step 5" in f.summary


# ---------------------------------------------------------------- ExplodingGradients
def test_exploding_fires_on_spike_relative_to_median() -> None:
    # A spike with evidence it matters (the next step is still over 5x): one lone spike is not enough.
    w = window([*steps(20, grad_norm=1.0), step(20, grad_norm=15.0, layers={"fc": {"grad_norm": 14.0}}),
                step(21, grad_norm=6.0)])
    f = ExplodingGradients().evaluate(w)
    assert f is not None and f.evidence["factor"] == pytest.approx(15.0) and f.layer == "fc"
    assert f.severity is None  # default (warning) below the critical factor


def test_exploding_critical_and_quiet_cases() -> None:
    assert ExplodingGradients().evaluate(window([*steps(20, grad_norm=1.0), step(20, grad_norm=500.0)])).severity \
        is Severity.CRITICAL
    assert ExplodingGradients().evaluate(window([*steps(20, grad_norm=1.0), step(20, grad_norm=5.0)])) is None
    assert ExplodingGradients().evaluate(window([*steps(5, grad_norm=1.0), step(5, grad_norm=100.0)])) is None


# ---------------------------------------------------------------- VanishingGradients
def test_vanishing_overall_and_first_last() -> None:
    attach = _attach([("l0", "Linear", 10_000), ("l1", "Linear", 10_000), ("emb", "Embedding", 10)])
    w = window(steps(30, grad_norm=1e-8), attach)
    f = VanishingGradients().evaluate(w)
    assert f is not None and f.evidence["grad_rms"] < 1e-7

    layers = {"l0": {"grad_norm": 1e-6}, "l1": {"grad_norm": 1.0}}
    f = VanishingGradients().evaluate(window(steps(30, grad_norm=1.0, layers=layers), attach))
    assert f is not None and f.layer == "l0" and f.evidence["first_last_ratio"] == pytest.approx(1e-6)

    ok = {"l0": {"grad_norm": 0.5}, "l1": {"grad_norm": 1.0}}
    assert VanishingGradients().evaluate(window(steps(30, grad_norm=1.0, layers=ok), attach)) is None


# ---------------------------------------------------------------- LearningRateTooHigh
def test_lr_too_high_update_ratio() -> None:
    f = LearningRateTooHigh().evaluate(window(steps(10, update_ratio=0.3, lr=[1.0], loss=1.0)))
    assert f is not None and f.severity is None  # warning
    f = LearningRateTooHigh().evaluate(window(steps(10, update_ratio=0.03, lr=[1e-3], loss=1.0)))
    assert f is not None and f.severity is Severity.INFO
    assert LearningRateTooHigh().evaluate(window(steps(10, update_ratio=1e-3, lr=[1e-3], loss=1.0))) is None


def test_lr_too_high_loss_after_lr_jump() -> None:
    lrs = [[0.01]] * 6 + [[0.1]] * 6
    losses = [1.0] * 6 + [1.5, 2.5, 3.0, 3.2, 3.5, 4.0]
    f = LearningRateTooHigh().evaluate(window(steps(12, lr=lrs, loss=losses, update_ratio=1e-3)))
    assert f is not None and f.evidence["lr_after"] == pytest.approx(0.1)
    # A warm-up ramp with a falling loss is not a finding.
    ramp = [[0.001 * (i + 1)] for i in range(12)]
    assert LearningRateTooHigh().evaluate(window(steps(12, lr=ramp, loss=healthy_loss[:12], update_ratio=1e-3))) \
        is None


# ---------------------------------------------------------------- LearningRateTooLow
def test_lr_too_low_only_when_lr_steady_at_peak() -> None:
    w = window(steps(50, update_ratio=1e-7, grad_norm=1.0, lr=[1e-7]), lr_peak=1e-7)
    assert LearningRateTooLow().evaluate(w) is not None
    # Cosine tail: LR far below its peak -> skipped.
    assert LearningRateTooLow().evaluate(
        window(steps(50, update_ratio=1e-7, grad_norm=1.0, lr=[1e-7]), lr_peak=1e-2)) is None
    # Warm-up: LR moving within the window -> skipped.
    ramp = [[1e-7 * (i + 1)] for i in range(50)]
    assert LearningRateTooLow().evaluate(window(steps(50, update_ratio=1e-7, grad_norm=1.0, lr=ramp))) is None
    assert LearningRateTooLow().evaluate(
        window(steps(50, update_ratio=1e-3, grad_norm=1.0, lr=[1e-3]), lr_peak=1e-3)) is None


# ---------------------------------------------------------------- WeightsNotUpdating
def test_weights_not_updating() -> None:
    stuck = {"a": {"grad_norm": 1.0, "update_ratio": 0.0}, "b": {"grad_norm": 1.0, "update_ratio": 1e-3}}
    f = WeightsNotUpdating().evaluate(window(steps(5, grad_norm=1.0, layers=stuck)))
    assert f is not None and f.layer == "a" and f.severity is None
    all_stuck = {"a": {"grad_norm": 1.0, "update_ratio": 0.0}}
    assert WeightsNotUpdating().evaluate(window(steps(5, grad_norm=1.0, layers=all_stuck))).severity \
        is Severity.CRITICAL
    moving = {"a": {"grad_norm": 1.0, "update_ratio": 1e-3}}
    assert WeightsNotUpdating().evaluate(window(steps(5, grad_norm=1.0, layers=moving))) is None
    no_grad = {"a": {"grad_norm": 0.0, "update_ratio": 0.0}}
    assert WeightsNotUpdating().evaluate(window(steps(5, grad_norm=0.0, layers=no_grad))) is None


# ---------------------------------------------------------------- LossDiverging
def test_loss_diverging() -> None:
    losses = [2.0 - 0.05 * i for i in range(20)] + [1.0 * 1.3**i for i in range(15)]
    f = LossDiverging().evaluate(window(steps(35, loss=losses)))
    assert f is not None and f.evidence["loss_recent"] > 2 * f.evidence["loss_best"]
    assert LossDiverging().evaluate(window(steps(60, loss=healthy_loss))) is None
    # Late-training noise on a tiny loss: doubled, but a small fraction of the progress made.
    noisy = [2.0 * 0.9**i for i in range(40)] + [0.05, 0.03, 0.06, 0.04, 0.07, 0.05, 0.06, 0.05]
    assert LossDiverging().evaluate(window(steps(48, loss=noisy))) is None


def test_lr_too_low_is_not_blamed_for_a_diverged_run() -> None:
    # Weights blew up: updates are tiny next to them, but the loss is far above where it started.
    blown = steps(50, update_ratio=1e-9, grad_norm=1.0, lr=[10.0], loss=[2.0] * 20 + [50.0] * 30)
    assert LearningRateTooLow().evaluate(window(blown, lr_peak=10.0)) is None
    slow = steps(50, update_ratio=1e-9, grad_norm=1.0, lr=[10.0], loss=[2.0] * 20 + [1.99] * 30)
    assert LearningRateTooLow().evaluate(window(slow, lr_peak=10.0)) is not None


def test_loss_plateau_is_not_blamed_for_a_diverged_run() -> None:
    from healthd.rules.loss_plateau import LossPlateau

    flat_high = steps(60, loss=[2.0] * 20 + [40.0 + 0.01 * (i % 2) for i in range(40)])
    assert LossPlateau().evaluate(window(flat_high)) is None
    flat_at_start = steps(60, loss=[2.0 + 0.01 * (i % 2) for i in range(60)])
    assert LossPlateau().evaluate(window(flat_at_start)) is not None


def test_activation_rules_ignore_steps_poisoned_by_nan() -> None:
    from healthd.rules.dead_activations import DeadActivations
    from healthd.wire.schema import ActivationStats

    dead = {"act": ActivationStats(kind="relu", dead_fraction=1.0)}
    poisoned = [step(i, loss=NAN, nonfinite=NonFinite(loss=1), activations=dead) for i in range(5)]
    assert DeadActivations().evaluate(window(poisoned)) is None
    healthy_but_dead = [step(i, loss=1.0, activations=dead) for i in range(5)]
    assert DeadActivations().evaluate(window(healthy_but_dead)) is not None
