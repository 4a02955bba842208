"""healthd.rules.input_not_normalized: model inputs with a mean far from 0 or a scale far from 1."""

from __future__ import annotations

import pytest

from healthd.rules.input_not_normalized import InputNotNormalized
from healthd.wire.schema import InputStats, Severity
from tests.healthd.factories import fires, step, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (InputNotNormalized(), window([step(0, inputs=InputStats(mean=4.9, std=6.0, abs_max=16))]), Severity.WARNING),
    (InputNotNormalized(), window([step(0, inputs=InputStats(mean=0.3, std=0.35, abs_max=1))]), Severity.INFO),
    (InputNotNormalized(), window([step(0, inputs=InputStats(mean=0.01, std=0.98, abs_max=5))]), False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
