"""healthd.rules.softmax_before_loss: probabilities where a loss expects logits or log-probabilities."""

from __future__ import annotations

import pytest

from healthd.rules.softmax_before_loss import SoftmaxBeforeLoss
from healthd.wire.schema import Severity
from tests.healthd.factories import ce, fires, step, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(rows_sum_to_one=True, all_non_negative=True)])]),
     Severity.WARNING),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(all_non_negative=True)])]), Severity.WARNING),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce()])]), False),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(fn="nll_loss", all_non_positive=True,
                                                         rows_sum_to_one=True)])]), False),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(fn="nll_loss", all_non_positive=True)])]), Severity.WARNING),
    (SoftmaxBeforeLoss(), window([step(0, loss_inputs=[ce(fn="nll_loss", all_non_negative=True)])]), Severity.WARNING),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
