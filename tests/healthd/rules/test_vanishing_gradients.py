"""healthd.rules.vanishing_gradients: tiny gradients overall, or the first layer's far below the last's."""

from __future__ import annotations

import pytest

from healthd.rules.vanishing_gradients import VanishingGradients
from healthd.wire.schema import AttachReport, LayerInfo, ModelSummary
from tests.healthd.factories import steps, window


def _attach(layers: list[tuple[str, str, int]]) -> AttachReport:
    return AttachReport(job="j", time=1.0, model=ModelSummary(
        param_count=sum(p for *_, p in layers), trainable_count=sum(p for *_, p in layers),
        layers=[LayerInfo(name=n, module_type=t, params=p) for n, t, p in layers]))


def test_vanishing_overall_and_first_last() -> None:
    attach = _attach([("l0", "Linear", 10_000), ("l1", "Linear", 10_000), ("emb", "Embedding", 10)])
    w = window(steps(30, grad_norm=1e-8), attach)
    f = VanishingGradients().evaluate(w)
    assert f is not None and f.evidence["grad_rms"] < 1e-7

    layers = {"l0": {"grad_norm": 1e-6}, "l1": {"grad_norm": 1.0}}
    f = VanishingGradients().evaluate(window(steps(30, grad_norm=1.0, layers=layers), attach))
    assert f is not None and f.layer == "l0" and f.evidence["first_last_ratio"] == pytest.approx(1e-6)

    ok = {"l0": {"grad_norm": 0.5}, "l1": {"grad_norm": 1.0}}
    assert VanishingGradients().evaluate(window(steps(30, grad_norm=1.0, layers=ok), attach)) is None
