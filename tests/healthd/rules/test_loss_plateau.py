"""healthd.rules.loss_plateau: a loss that falls by less than its own noise."""

from __future__ import annotations

import math

import pytest

from healthd.rules.loss_plateau import LossPlateau
from healthd.wire.schema import Severity
from tests.healthd.factories import falling, fires, steps, window

noisy = [2.0 + 0.05 * math.sin(i * 1.7) for i in range(40)]


CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (LossPlateau(), window(steps(40, loss=noisy)), Severity.WARNING),
    (LossPlateau(), window(steps(40, loss=falling)), False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected


def test_loss_plateau_is_not_blamed_for_a_diverged_run() -> None:
    flat_high = steps(60, loss=[2.0] * 20 + [40.0 + 0.01 * (i % 2) for i in range(40)])
    assert LossPlateau().evaluate(window(flat_high)) is None
    flat_at_start = steps(60, loss=[2.0 + 0.01 * (i % 2) for i in range(60)])
    assert LossPlateau().evaluate(window(flat_at_start)) is not None
