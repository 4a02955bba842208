"""engine.rank_rules_every_steps: rank rules run on every k-th step, and always on a NaN/Inf step."""

from __future__ import annotations

import math

from healthd.app import build
from healthd.schema import NonFinite
from healthd.settings import Settings
from tests.healthd.factories import step


def _hd(every: int):
    return build(Settings.from_mapping({"engine": {"rank_rules_every_steps": every}}))


def test_every_kth_step_is_evaluated_and_default_is_every_step() -> None:
    for every, expected in ((1, 30), (10, 3)):
        hd = _hd(every)
        for i in range(1, 31):
            hd.store.apply(step(i, loss=1.0, grad_norm=1.0), 0.0)
            hd.engine.on_step(hd.store.rank_window("j", 0))
        assert hd.engine.evaluation_count == expected


def test_a_nan_step_is_never_skipped() -> None:
    hd = _hd(100)
    for i in range(1, 6):
        hd.store.apply(step(i, loss=1.0, grad_norm=1.0), 0.0)
        hd.engine.on_step(hd.store.rank_window("j", 0))
    hd.store.apply(step(7, loss=math.nan, nonfinite=NonFinite(loss=1)), 0.0)
    hd.engine.on_step(hd.store.rank_window("j", 0))
    (alert,) = hd.engine.firing()
    assert alert.rule == "NonFiniteValues" and alert.step == 7
