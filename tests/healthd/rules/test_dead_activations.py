"""healthd.rules.dead_activations: ReLU-family units that are never active."""

from __future__ import annotations

import math

import pytest

from healthd.rules.dead_activations import DeadActivations
from healthd.wire.schema import ActivationStats, NonFinite, Severity
from tests.healthd.factories import fires, step, window

NAN = math.nan


CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (DeadActivations(), window([step(0, activations={"1": ActivationStats(kind="relu", dead_fraction=0.95)})]),
     Severity.CRITICAL),
    (DeadActivations(), window([step(0, activations={"1": ActivationStats(kind="relu", dead_fraction=0.6)}),
                                step(10, activations={"1": ActivationStats(kind="relu", dead_fraction=0.2)})]), False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected


def test_activation_rules_ignore_steps_poisoned_by_nan() -> None:
    dead = {"act": ActivationStats(kind="relu", dead_fraction=1.0)}
    poisoned = [step(i, loss=NAN, nonfinite=NonFinite(loss=1), activations=dead) for i in range(5)]
    assert DeadActivations().evaluate(window(poisoned)) is None
    healthy_but_dead = [step(i, loss=1.0, activations=dead) for i in range(5)]
    assert DeadActivations().evaluate(window(healthy_but_dead)) is not None
