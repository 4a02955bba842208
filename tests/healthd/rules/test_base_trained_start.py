"""trained_start: a run starts from trained weights by the attach hint, or by a step-0 loss far below chance."""

from __future__ import annotations

import math

import pytest

from healthd.rules.base import TRAINED_START_RATIO, loss_classes, trained_start
from healthd.wire.schema import AttachReport, Hints
from tests.healthd.factories import ce, step, steps, window

CHANCE = math.log(10)


def _attach(**hints: object) -> AttachReport:
    return AttachReport(job="j", time=1.0, hints=Hints(**hints))


# (first losses, hints, first step, says why (a substring) or None)
CASES = [
    ([0.4 * CHANCE, 0.3], {"num_classes": 10}, 0, "0.4x the chance level ln(10)"),  # a plain load_state_dict
    ([CHANCE, 0.3], {"num_classes": 10}, 0, None),  # from scratch: at chance
    ([0.6 * CHANCE, 0.3], {"num_classes": 10}, 0, "0.6x"),  # 0.6x: below 2/3 of chance
    ([0.7 * CHANCE, 0.3], {"num_classes": 10}, 0, None),  # below chance, not by a third
    ([3 * CHANCE, 0.3], {"num_classes": 10}, 0, None),  # above chance
    ([CHANCE, 0.3], {"num_classes": 10, "fine_tune": True}, 0, "the attach hint fine_tune"),
    ([0.1, 0.1], {}, 0, None),  # no C: no chance level to compare with
    ([0.1, 0.1], {"num_classes": 10}, 5, None),  # first report not step 0 (a resumed run): no init seen
    ([math.nan, 0.1], {"num_classes": 10}, 0, None),
]


@pytest.mark.parametrize(("losses", "hints", "start", "why"), CASES)
def test_trained_start_table(losses: list[float], hints: dict[str, object], start: int, why: str | None) -> None:
    got = trained_start(window(steps(len(losses), start=start, loss=losses), _attach(**hints)))
    if why is None:
        assert got is None
    else:
        assert got is not None and why in got


def test_classes_come_from_the_inspected_cross_entropy_input_without_a_hint() -> None:
    w = window([step(0, loss=0.3 * CHANCE, loss_inputs=[ce()]), step(1, loss=0.5)], _attach())
    assert loss_classes(w) == 10
    assert trained_start(w) is not None
    assert TRAINED_START_RATIO == pytest.approx(2 / 3)
