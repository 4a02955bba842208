"""healthd.rules.overfitting: validation loss rising above its best while the training loss keeps falling."""

from __future__ import annotations

import pytest

from healthd.rules.overfitting import Overfitting
from healthd.wire.schema import EvalReport, Severity
from tests.healthd.factories import fires, steps, window


def _evals(losses: list[float]) -> list[EvalReport]:
    return [EvalReport(job="j", time=1.0, step=10 * (i + 1) - 1, loss=v) for i, v in enumerate(losses)]


@pytest.mark.parametrize(("val", "expected"), [
    ([1.0, 0.8, 0.9, 1.1], Severity.WARNING),  # rises 10%+ above its best for two passes while train falls
    ([1.0, 0.8, 0.7, 0.65], Severity.INFO),  # improving, but the gap to train grows: unsure, so info
    ([1.0, 0.8, 0.95, 0.7], Severity.INFO),  # one bad pass is not a rise
    ([0.86, 0.65, 0.44, 0.23], False),  # val tracks train within 5%
])
def test_overfitting(val: list[float], expected: object) -> None:
    train = [1.0 - 0.02 * i for i in range(40)]
    w = window(steps(40, loss=train), evals=_evals(val))
    assert fires(Overfitting(), w) == expected
