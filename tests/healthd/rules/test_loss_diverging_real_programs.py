"""LossDiverging on real loss curves: minibatch noise near convergence is not divergence."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from healthd.rules.loss_diverging import LossDiverging
from healthd.wire.schema import Severity
from tests.healthd.factories import steps, window


def _converged(seed: int, level: float, n: int = 200, sigma: float = 0.8) -> list[float]:
    """Minibatch losses of a converged classifier: heavy-tailed (log-normal) around a small level."""
    rng = random.Random(seed)
    return [level * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def _run(seed: int, level: float) -> list[float]:
    """From ln(10) down to ``level``, then converged noise."""
    descent = [max(level, 2.3 * 0.97**i) for i in range(120)]
    rng = random.Random(seed + 100)
    return [v * math.exp(rng.gauss(0.0, 0.2)) for v in descent] + _converged(seed, level)


def _every_evaluation(losses: list[float]) -> list[int]:
    """The steps at which the rule found something, evaluating after each step as the engine does."""
    rule, hits = LossDiverging(), []
    all_steps = steps(len(losses), loss=losses)
    for end in range(10, len(losses) + 1, 3):
        w = dataclasses.replace(window(all_steps[max(0, end - 200):end]), initial_steps=all_steps[:20])
        if rule.evaluate(w) is not None:
            hits.append(end)
    return hits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("level", [0.005, 0.04, 0.1])
def test_converged_classifier_is_quiet(seed: int, level: float) -> None:
    assert _every_evaluation(_run(seed, level)) == []


def test_the_reported_case_median_0128_vs_best_0040() -> None:
    # The best smoothed value is an outlier of the noise; the recent median is within the noise.
    losses = _converged(11, 0.07) + [0.1, 0.128, 0.15, 0.09, 0.2]
    w = window(steps(len(losses), loss=losses))
    assert LossDiverging().evaluate(w) is None


def _rise(seed: int, level: float, to: float, over: int) -> list[float]:
    base = _converged(seed, level, n=100, sigma=0.5)
    rng = random.Random(seed + 7)
    return base + [(level + (to - level) * (i + 1) / over) * math.exp(rng.gauss(0.0, 0.1)) for i in range(over)]


@pytest.mark.parametrize("seed", range(3))
def test_a_real_divergence_from_convergence_fires(seed: int) -> None:
    # converged at 0.05, then the loss climbs 20x over 20 steps (a learning-rate spike, a bad shard)
    losses = _rise(seed, 0.05, 1.0, 20)
    f = LossDiverging().evaluate(window(steps(len(losses), loss=losses)))
    assert f is not None and f.evidence["loss_recent"] > 10 * f.evidence["loss_best"]
    assert "noise" in f.summary


def test_a_sign_flip_fires_critical() -> None:
    losses = [2.3 * 1.1**i for i in range(40)]
    f = LossDiverging().evaluate(window(steps(40, loss=losses)))
    assert f is not None and f.severity is Severity.CRITICAL


def test_windows_that_straddle_a_nan_are_not_judged() -> None:
    # climbing to a NaN: after it, nothing before it is read again (NonFiniteValues owns the incident)
    losses = [0.5] * 30 + [0.5 * 2**i for i in range(8)] + [math.nan] * 20
    assert LossDiverging().evaluate(window(steps(len(losses), loss=losses))) is None
    # a transient NaN, then a finite series: judged again once enough finite steps are in
    losses = [0.5] * 30 + [math.nan] + [0.5] * 10 + [0.5 * 1.5**i for i in range(12)]
    assert LossDiverging().evaluate(window(steps(len(losses), loss=losses))) is not None
