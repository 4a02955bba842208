"""healthd.rules.learning_rate_not_scaled: a global batch that changed while the learning rate did not."""

from __future__ import annotations

import pytest

from healthd.rules.learning_rate_not_scaled import LearningRateNotScaled
from healthd.wire.schema import Severity
from tests.healthd.factories import fires, steps, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (LearningRateNotScaled(), window(steps(10, batch_size=[32] * 6 + [256] * 4, lr=[0.1])), Severity.WARNING),
    (LearningRateNotScaled(), window(steps(10, batch_size=[32] * 6 + [256] * 4,
                                           lr=[[0.1]] * 6 + [[0.8]] * 4)), False),  # linear scaling
    (LearningRateNotScaled(), window(steps(10, batch_size=[32] * 9 + [7], lr=[0.1])), False),  # short last batch
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
