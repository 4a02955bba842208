"""healthd.rules.saturated_activations: sigmoid/tanh units in the flat region."""

from __future__ import annotations

import pytest

from healthd.rules.saturated_activations import SaturatedActivations
from healthd.wire.schema import ActivationStats, Severity
from tests.healthd.factories import fires, step, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (SaturatedActivations(), window([step(0, activations={"1": ActivationStats(kind="tanh", saturated_fraction=0.7)})]),
     Severity.WARNING),
    (SaturatedActivations(), window([step(0, activations={"1": ActivationStats(kind="relu", dead_fraction=0.7)})]),
     False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
