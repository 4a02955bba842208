"""healthd.state.windows: RankWindow's readers return what the plain list comprehensions they replace return."""

from __future__ import annotations

import random

from healthd.state.windows import finite
from healthd.wire.schema import StepReport
from tests.healthd.factories import steps, window


def _keep(s: StepReport) -> bool:
    return s.loss is not None and s.loss > 1


def test_latest_where_equals_filter_then_tail() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 40)
        hist = steps(n, loss=[rng.choice([None, 1.0, 2.0]) for _ in range(n)])
        w = window(hist)
        count, lookback = rng.randint(1, 6), rng.randint(1, 50)
        assert w.latest_where(_keep, count, lookback) == [s for s in w.last(lookback) if _keep(s)][-count:]


def test_finite_drops_none_nan_and_inf_in_both_paths() -> None:
    assert finite([1.0, 2.0, 3]) == [1.0, 2.0, 3]
    assert finite([1.0, None, float("nan"), float("inf"), -2.0]) == [1.0, -2.0]
    assert finite([1e308, 1e308]) == [1e308, 1e308]  # the sum overflows; the values are finite
    assert finite([]) == []
