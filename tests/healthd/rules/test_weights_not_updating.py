"""healthd.rules.weights_not_updating: a layer with gradients whose parameters do not move."""

from __future__ import annotations

from healthd.rules.weights_not_updating import WeightsNotUpdating
from healthd.wire.schema import Severity
from tests.healthd.factories import steps, window


def test_weights_not_updating() -> None:
    stuck = {"a": {"grad_norm": 1.0, "update_ratio": 0.0}, "b": {"grad_norm": 1.0, "update_ratio": 1e-3}}
    f = WeightsNotUpdating().evaluate(window(steps(5, grad_norm=1.0, layers=stuck)))
    assert f is not None and f.layer == "a" and f.severity is None
    all_stuck = {"a": {"grad_norm": 1.0, "update_ratio": 0.0}}
    assert WeightsNotUpdating().evaluate(window(steps(5, grad_norm=1.0, layers=all_stuck))).severity \
        is Severity.CRITICAL
    moving = {"a": {"grad_norm": 1.0, "update_ratio": 1e-3}}
    assert WeightsNotUpdating().evaluate(window(steps(5, grad_norm=1.0, layers=moving))) is None
    no_grad = {"a": {"grad_norm": 0.0, "update_ratio": 0.0}}
    assert WeightsNotUpdating().evaluate(window(steps(5, grad_norm=0.0, layers=no_grad))) is None
