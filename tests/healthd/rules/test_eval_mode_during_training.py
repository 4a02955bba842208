"""healthd.rules.eval_mode_during_training: the model in eval mode while the optimizer steps."""

from __future__ import annotations

import pytest

from healthd.rules.eval_mode_during_training import EvalModeDuringTraining
from healthd.wire.schema import Severity
from tests.healthd.factories import fires, steps, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (EvalModeDuringTraining(), window(steps(4, training=[True, True, False, False])), Severity.WARNING),
    (EvalModeDuringTraining(), window(steps(4, training=[True, True, True, False])), False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
