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


def test_adapters_missing_from_an_optimizer_that_holds_frozen_tensors_are_named_at_once() -> None:
    from healthd.wire.schema import StaticFinding
    from tests.healthd.factories import attach, window

    found = [StaticFinding(check="frozen_in_optimizer", detail="148 of 148 tensors ... requires_grad=False"),
             *(StaticFinding(check="trainable_not_in_optimizer", layer=f"h.{i}.attn.c_attn:lora") for i in range(8))]
    f = WeightsNotUpdating().evaluate(window(steps(1, loss=[4.0]), attach(static_findings=found)))
    assert f is not None and f.severity is Severity.CRITICAL and f.layer == "h.0.attn.c_attn:lora"
    assert "8 trainable layers will never train" in f.summary and "h.5.attn.c_attn:lora and 2 more" in f.summary
    assert f.evidence["layers_not_in_optimizer"] == 8 and "h.7.attn.c_attn:lora" in str(f.evidence["layer_names"])
    alone = [StaticFinding(check="trainable_not_in_optimizer", layer="h.0.attn.c_attn:lora")]
    assert WeightsNotUpdating().evaluate(window(steps(1, loss=[4.0]), attach(static_findings=alone))) is None
