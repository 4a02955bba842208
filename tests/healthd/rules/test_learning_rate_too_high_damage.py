"""LearningRateTooHigh under adaptive optimizers, clipping and the damage oversized updates leave:
an info-level ratio warns with damage, and the finding stays while the damage persists."""

from __future__ import annotations

from typing import Any

import pytest

from healthd.rules.learning_rate_too_high import LearningRateTooHigh
from healthd.wire.schema import Hints, Severity
from tests.healthd.factories import attach, steps, window

N = 80
WARN = None  # the rule's default severity: warning


def _sampled(early: float, late: float, switch: int = 30) -> list[float | None]:
    """An update ratio sampled every 10 steps: ``early`` before ``switch``, ``late`` from it on."""
    return [None if i % 10 else (early if i < switch else late) for i in range(N)]


def _dead(from_step: int) -> list[dict[str, Any]]:
    live = {"grad_norm": 0.5}
    return [{"a": live, "b": {"grad_norm": 0.0 if i >= from_step else 0.5}} for i in range(N)]


FALLING = [2.3 * 0.97**i for i in range(N)]
STALLED = [2.3 if i < 5 else 2.0 for i in range(N)]
ROSE_BACK = [2.3 * 0.9**i if i < 40 else 1.5 for i in range(N)]


@pytest.mark.parametrize(("ratios", "loss", "layers", "expected"), [
    (_sampled(0.05, 0.05), FALLING, None, Severity.INFO),  # Adam's healthy start: an info only
    (_sampled(0.05, 0.05), STALLED, None, WARN),  # Adadelta at 100x: the loss never got going
    (_sampled(0.05, 0.05), ROSE_BACK, None, WARN),  # AdamW + clipping at 100x: the loss gives its progress back
    (_sampled(0.05, 0.05), FALLING, _dead(60), WARN),  # layers died
    (_sampled(0.5, 0.005), STALLED, None, WARN),  # killed by oversized updates; they look small now
    (_sampled(0.5, 0.005), FALLING, _dead(60), WARN),  # the dead layers persist
    (_sampled(0.5, 0.005), FALLING, None, "none"),  # a large first step, then healthy: nothing
    (_sampled(0.005, 0.005), STALLED, _dead(60), "none"),  # never oversized: another rule's finding
    (_sampled(0.2, 0.2), FALLING, None, WARN),  # oversized now: warns as always
])
def test_damage_names_the_cause(ratios: list[float | None], loss: list[float], layers: list[dict[str, Any]] | None,
                                expected: Severity | str | None) -> None:
    series: dict[str, Any] = {"update_ratio": ratios, "loss": loss, "lr": [1e-3], "grad_norm": 0.5}
    if layers is not None:
        series["layers"] = layers
    found = LearningRateTooHigh().evaluate(window(steps(N, **series)))
    if expected == "none":
        assert found is None
    else:
        assert found is not None and found.severity == expected, found


def test_persisting_damage_cites_the_oversized_updates() -> None:
    w = window(steps(N, update_ratio=_sampled(0.5, 0.005), loss=STALLED, lr=[1e-3], grad_norm=0.5))
    found = LearningRateTooHigh().evaluate(w)
    assert found is not None
    assert found.evidence["oversized_update_ratio"] == 0.5 and found.evidence["oversized_step"] == 20
    assert "stalled" in found.summary


@pytest.mark.parametrize(("norms", "clipped"), [
    ([1.0] * N, True),  # clip_grad_norm_(1.0) active on every step: the post-clip norm is pinned
    ([1.0 if i % 2 else 0.3 + 0.001 * i for i in range(N)], True),  # half the steps
    ([0.3 + 0.01 * i for i in range(N)], False),  # free gradient norms
])
def test_clipping_inferred_from_a_pinned_norm(norms: list[float], clipped: bool) -> None:
    w = window(steps(N, update_ratio=_sampled(0.05, 0.05), loss=ROSE_BACK, lr=[1e-3], grad_norm=norms))
    found = LearningRateTooHigh().evaluate(w)
    assert found is not None
    assert ("clipped_grad_norm" in found.evidence) is clipped
    if clipped:
        assert found.evidence["clipped_grad_norm"] == 1.0 and "clipping" in found.summary


# RMSprop 100x too high on the zoo's MLP (lr_too_high_rmsprop, 3 seeds): the loss at step 0 (before any
# update) is at chance, the first updates throw it to 50-140x that, then it crawls back; by step 25 the
# update ratio is only 40-150x the 1e-3 rule of thumb, and the run ends 3-10x worse than at lr=1e-3.
EARLY = 30  # before damage_min_steps: the stall and the give-back cannot be judged yet
BLOWN_UP = [2.3, *(250.0 * 0.8**i + 2.0 for i in range(EARLY - 1))]  # 250 -> ~2.4: above its start still
RECOVERED = [2.3, *(250.0 * 0.8**i + 0.5 for i in range(N - 1))]  # ... -> 0.5: back below its start
BUMP = [2.3, *(5.0 if i < 10 else 2.4 for i in range(EARLY - 1))]  # at most ~2.2x its start


@pytest.mark.parametrize(("n", "loss", "hints", "start", "expected"), [
    (EARLY, BLOWN_UP, None, 0, WARN),  # blown up from its step-0 start and still above it
    (EARLY, BUMP, None, 0, Severity.INFO),  # under blowup_factor (3x)
    (N, RECOVERED, None, 0, Severity.INFO),  # it came back below its start: no damage left
    (EARLY, BLOWN_UP, Hints(loss_kind="adversarial"), 0, Severity.INFO),  # a GAN player's loss rises by design
    (EARLY, BLOWN_UP, None, 1000, Severity.INFO),  # attached to a resumed run: no loss before any update
])
def test_a_loss_blown_up_from_its_start_is_damage(n: int, loss: list[float], hints: Hints | None, start: int,
                                                   expected: Severity | None) -> None:
    series: dict[str, Any] = {"update_ratio": _sampled(0.05, 0.05)[:n], "loss": loss[:n], "lr": [0.1],
                              "grad_norm": [0.3 + 0.01 * i for i in range(n)]}
    w = window(steps(n, start=start, **series), attach(hints=hints) if hints else None)
    found = LearningRateTooHigh().evaluate(w)
    assert found is not None and found.severity == expected, found
    if expected == WARN:
        assert "blew up" in found.summary and found.evidence["step0_loss"] == 2.3
