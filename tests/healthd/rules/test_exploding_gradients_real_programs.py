"""ExplodingGradients on real gradient norms: one large minibatch gradient is not an explosion."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from healthd.rules.exploding_gradients import ExplodingGradients
from healthd.wire.schema import Severity
from tests.healthd.factories import steps, window


def _healthy(seed: int, n: int = 80, norm: float = 0.09, loss: float = 0.007) -> tuple[list[float], list[float]]:
    """Grad norms and losses of a converged SGD+momentum+BatchNorm CNN: heavy-tailed, both."""
    rng = random.Random(seed)
    norms = [norm * math.exp(rng.gauss(0.0, 0.5)) for _ in range(n)]
    losses = [loss * math.exp(rng.gauss(0.0, 1.0)) for _ in range(n)]
    return norms, losses


def _evaluate_each(norms: list[float], losses: list[float]) -> list[int]:
    rule, hits = ExplodingGradients(), []
    all_steps = steps(len(norms), grad_norm=norms, loss=losses)
    for end in range(1, len(norms) + 1):
        f = rule.evaluate(window(all_steps[:end]))
        if f is not None:
            hits.append(f.step)
    return hits


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("where", [40, 60, 79])
def test_one_10x_gradient_near_convergence_is_quiet(seed: int, where: int) -> None:
    # the reported case: one step's norm 0.91 vs a median 0.09, its minibatch's loss high too, then back
    norms, losses = _healthy(seed)
    norms[where], losses[where] = 0.91, 0.2
    assert _evaluate_each(norms, losses) == []


@pytest.mark.parametrize("seed", range(3))
def test_isolated_outliers_far_apart_are_quiet(seed: int) -> None:
    norms, losses = _healthy(seed, n=120)
    for i in (30, 55, 90):
        norms[i] = 12 * 0.09
    assert _evaluate_each(norms, losses) == []


def test_100x_on_its_own_fires_at_that_step_critical() -> None:
    norms, losses = _healthy(0)
    norms[50] = 0.09 * 500
    hits = _evaluate_each(norms, losses)
    assert hits and hits[0] == 50
    f = ExplodingGradients().evaluate(window(steps(51, grad_norm=norms[:51], loss=losses[:51])))
    assert f is not None and f.severity is Severity.CRITICAL and "on its own" in f.summary


@pytest.mark.parametrize("seed", range(3))
def test_sustained_or_growing_fires_at_the_second_step(seed: int) -> None:
    norms, losses = _healthy(seed)
    norms[50:54] = [0.09 * 3, 0.09 * 6, 0.09 * 12, 0.09 * 30]  # growing: each step worse
    hits = _evaluate_each(norms, losses)
    assert hits and hits[0] == 52  # the first step over 10x, with its neighbour over 5x


@pytest.mark.parametrize("seed", range(3))
def test_spike_followed_by_loss_damage_fires_at_the_damage(seed: int) -> None:
    norms, losses = _healthy(seed)
    norms[50] = 0.09 * 20
    losses[51:] = [5.0] * (len(losses) - 51)  # the update threw the weights away
    hits = _evaluate_each(norms, losses)
    assert hits and hits[0] == 52  # two damaged losses in a row: one can be a hard minibatch


def test_a_batch_of_new_steps_is_judged_whole() -> None:
    # several steps arrive in one request: the spike among them, its damage after it
    norms, losses = _healthy(1)
    norms[50], losses[52], losses[53] = 0.09 * 20, 9.0, 7.0
    w = dataclasses.replace(window(steps(55, grad_norm=norms[:55], loss=losses[:55])), new_steps=10)
    f = ExplodingGradients().evaluate(w)
    assert f is not None and f.evidence["spike_step"] == 50 and f.step == 53
