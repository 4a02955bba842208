"""healthd.rules.loss_input_broadcast: an elementwise loss whose input and target shapes broadcast."""

from __future__ import annotations

import pytest

from healthd.rules.loss_input_broadcast import LossInputBroadcast
from healthd.wire.schema import LossInputCheck, Severity
from tests.healthd.factories import fires, step, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (LossInputBroadcast(), window([step(0, loss_inputs=[LossInputCheck(fn="mse_loss", input_shape=[8, 1],
                                                                       target_shape=[8], broadcasts=True)])]),
     Severity.CRITICAL),
    (LossInputBroadcast(), window([step(0, loss_inputs=[LossInputCheck(fn="mse_loss", input_shape=[8],
                                                                       target_shape=[8])])]), False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
