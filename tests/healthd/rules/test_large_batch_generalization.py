"""healthd.rules.large_batch_generalization: a global batch that is a large part of the data or the noise scale."""

from __future__ import annotations

import pytest

from healthd.rules.large_batch_generalization import LargeBatchGeneralization
from healthd.wire.schema import Hints, Severity
from tests.healthd.factories import attach, fires, steps, window

CASES = [
    # rule, window, expected (False: no finding; a Severity: fires at it)
    (LargeBatchGeneralization(), window(steps(3, batch_size=512), attach(hints=Hints(dataset_size=1400))),
     Severity.WARNING),
    (LargeBatchGeneralization(), window(steps(3, batch_size=100), attach(hints=Hints(dataset_size=1400))),
     Severity.INFO),
    (LargeBatchGeneralization(), window(steps(3, batch_size=32), attach(hints=Hints(dataset_size=1400))), False),
]


@pytest.mark.parametrize(("rule", "w", "expected"), CASES, ids=[f"{type(c[0]).__name__}-{i}" for i, c in
                                                                 enumerate(CASES)])
def test_table(rule: object, w: object, expected: object) -> None:
    assert fires(rule, w) == expected


# ------------------------------------------------------------------ noise-scale branch
@pytest.mark.parametrize(("global_batch", "noise_scale", "severity"), [
    (4096, 100.0, "warning"),  # 41x above B_simple
    (512, 100.0, None),  # within 0.1x .. 10x
    (8, 100.0, "info"),  # 0.08x: room for parallelism
    (4096, None, None),  # not measured (no DDP)
])
def test_large_batch_generalization_uses_noise_scale(global_batch: int, noise_scale: float | None,
                                                     severity: str | None) -> None:
    rule = LargeBatchGeneralization()
    f = rule.evaluate(window(steps(5, start=200, batch_size=global_batch // 2), global_batch_size=global_batch,
                             noise_scale=noise_scale))
    # Early in training B_simple is systematically small: not judged before the warm-up.
    early = rule.evaluate(window(steps(5, batch_size=global_batch // 2), global_batch_size=global_batch,
                                 noise_scale=noise_scale))
    assert early is None or early.evidence.get("noise_scale") is None
    if severity is None:
        assert f is None
    else:
        assert f is not None and (f.severity or rule.severity).value == severity
        assert f.evidence["noise_scale"] == noise_scale
