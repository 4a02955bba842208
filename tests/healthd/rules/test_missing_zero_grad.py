"""healthd.rules.missing_zero_grad: gradients of the previous step still there when the next backward began."""

from __future__ import annotations

import pytest

from healthd.rules.missing_zero_grad import MissingZeroGrad
from healthd.wire.schema import Severity
from tests.healthd.factories import fires, steps, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (MissingZeroGrad(), window(steps(3, grads_stale_at_backward=True)), Severity.CRITICAL),
    (MissingZeroGrad(), window(steps(3, grads_stale_at_backward=[True, False, True])), False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
