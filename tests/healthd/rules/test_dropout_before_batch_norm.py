"""healthd.rules.dropout_before_batch_norm: a dropout layer directly followed by batch norm."""

from __future__ import annotations

import pytest

from healthd.rules.dropout_before_batch_norm import DropoutBeforeBatchNorm
from healthd.wire.schema import Severity, StaticFinding
from tests.healthd.factories import attach, fires, step, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (DropoutBeforeBatchNorm(), window([step(0)], attach(static_findings=[
        StaticFinding(check="dropout_before_batchnorm", layer="2")])), Severity.WARNING),
    (DropoutBeforeBatchNorm(), window([step(0)], attach(static_findings=[StaticFinding(check="batchnorm", layer="1")])),
     False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected
