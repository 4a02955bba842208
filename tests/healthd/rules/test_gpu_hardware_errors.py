"""healthd.rules.gpu_hardware_errors: XID hardware events, uncorrected ECC errors, failed or pending row remaps."""

from __future__ import annotations

from typing import Any

import pytest

from healthd.rules.gpu_hardware_errors import GPUHardwareErrors
from healthd.wire.schema import Severity
from tests.healthd.factories import rank_window, sample, series


@pytest.mark.parametrize(
    ("last", "fires", "severity"),
    [
        (dict(xid_events=[79]), True, None),  # fell off the bus: critical (the rule's default)
        (dict(xid_events=[48]), True, None),  # double-bit ECC
        (dict(xid_events=[13, 43]), False, None),  # application errors, not hardware
        (dict(ecc_uncorrected_total=3), True, None),
        (dict(remapped_rows_failure=True), True, None),
        (dict(remapped_rows_pending=True), True, Severity.WARNING),
        (dict(ecc_uncorrected_total=0, remapped_rows_failure=False, remapped_rows_pending=False), False, None),
    ],
)
def test_hardware_errors(last: dict[str, Any], fires: bool, severity: Severity | None) -> None:
    f = GPUHardwareErrors().evaluate(rank_window([*series(5), sample(5, **last)]))
    assert (f is not None) is fires
    if f:
        assert f.severity is severity and f.rank == 0 and "node-1" in f.summary
    assert GPUHardwareErrors.severity is Severity.CRITICAL


def test_xid_leaves_the_window() -> None:
    w = rank_window([sample(0, xid_events=[79]), *series(12)])
    assert GPUHardwareErrors().evaluate(w) is None
