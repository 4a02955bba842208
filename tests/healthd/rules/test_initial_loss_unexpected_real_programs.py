"""InitialLossUnexpected judges the loss of the first forward pass (step 0, before any update), only it."""

from __future__ import annotations

import math

import pytest

from healthd.rules.initial_loss_unexpected import InitialLossUnexpected
from healthd.wire.schema import AttachReport, Hints, Severity
from tests.healthd.factories import steps, window

TEN_CLASSES = AttachReport(job="j", time=1.0, hints=Hints(num_classes=10))
CHANCE = math.log(10)


@pytest.mark.parametrize("after", [[50.0, 80.0], [1e4, 1e6, 1e8], [12.0, 12.0, 12.0, 12.0]])
def test_a_loss_blown_up_after_updates_is_not_a_wrong_init(after: list[float]) -> None:
    # step 0 at chance; the learning rate blows it up from step 1 on: LearningRateTooHigh's, not the init's
    w = window(steps(1 + len(after), loss=[2.31, *after]), TEN_CLASSES)
    assert InitialLossUnexpected().evaluate(w) is None


@pytest.mark.parametrize(("first", "severity"), [(12.0, None), (0.2, Severity.INFO), (3.9, None), (1.3, Severity.INFO)])
def test_a_wrong_step_0_loss_fires_and_says_it_is_step_0(first: float, severity: Severity | None) -> None:
    # then falls to chance right after the first updates: the init was still wrong (far below chance: an info,
    # most likely trained weights)
    w = window(steps(4, loss=[first, CHANCE, CHANCE, CHANCE]), TEN_CLASSES)
    f = InitialLossUnexpected().evaluate(w)
    assert f is not None and f.severity is severity
    assert "step 0" in f.summary and "before any update" in f.summary and f.evidence["step"] == 0


def test_a_rank_whose_first_report_is_not_step_0_is_not_judged() -> None:
    w = window(steps(4, start=1000, loss=12.0), TEN_CLASSES)
    assert InitialLossUnexpected().evaluate(w) is None


def test_more_first_steps_is_a_median_from_step_0() -> None:
    rule = InitialLossUnexpected(InitialLossUnexpected.Config(first_steps=3))
    f = rule.evaluate(window(steps(3, loss=[12.0, 12.0, 2.3]), TEN_CLASSES))
    assert f is not None and "steps 0-2" in f.summary
