"""healthd.rules.batch_norm_small_batch: batch norm with a tiny per-device batch."""

from __future__ import annotations

import pytest

from healthd.rules.batch_norm_small_batch import BatchNormSmallBatch
from healthd.wire.schema import Severity, StaticFinding
from tests.healthd.factories import attach, fires, steps, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (BatchNormSmallBatch(), window(steps(5, batch_size=4), attach(static_findings=[
        StaticFinding(check="batchnorm", layer="1")])), Severity.WARNING),
    (BatchNormSmallBatch(), window(steps(5, batch_size=1), attach(static_findings=[
        StaticFinding(check="batchnorm", layer="1")])), Severity.CRITICAL),
    (BatchNormSmallBatch(), window(steps(5, batch_size=12), attach(world_size=4, static_findings=[
        StaticFinding(check="batchnorm", layer="1")])), Severity.INFO),
    (BatchNormSmallBatch(), window(steps(5, batch_size=4)), False),  # no batch norm
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
