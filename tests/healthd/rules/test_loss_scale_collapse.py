"""healthd.rules.loss_scale_collapse: AMP's dynamic loss scale collapsing, steps skipped again and again."""

from __future__ import annotations

import pytest

from healthd.rules.loss_scale_collapse import LossScaleCollapse
from tests.healthd.factories import steps, window


@pytest.mark.parametrize(("skipped", "scales", "fires"), [
    ([False] * 10, [65536.0] * 10, False),
    ([False] * 8 + [True, False], [65536.0] * 8 + [32768.0] * 2, False),  # an occasional skip is normal
    ([False] * 4 + [True] * 6, [65536.0 / 2**k for k in [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]], True),  # 6 in a row
    ([False, True] * 5, [1024.0] * 10, False),  # 50 %, but the window is not full
    ([False] * 10, [8.0, 4.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], True),  # fell to <= 1
])
def test_loss_scale_collapse(skipped: list[bool], scales: list[float], fires: bool) -> None:
    f = LossScaleCollapse().evaluate(window(steps(len(skipped), step_skipped=skipped, loss_scale=scales)))
    assert (f is not None) is fires


def test_loss_scale_collapse_skipped_fraction_in_full_window() -> None:
    rule = LossScaleCollapse(LossScaleCollapse.Config(window_steps=10, max_consecutive_skipped=5))
    f = rule.evaluate(window(steps(10, step_skipped=[False, True, False, True, True] * 2, loss_scale=1024.0)))
    assert f is not None and f.evidence["skipped_fraction"] == 0.6
