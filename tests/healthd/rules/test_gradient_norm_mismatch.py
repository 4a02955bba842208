"""healthd.rules.gradient_norm_mismatch: a rank's local gradient norm far above or below the other ranks'."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import pytest

from healthd.rules.gradient_norm_mismatch import GradientNormMismatch, leave_one_out_medians
from healthd.state.windows import JobWindow, finite
from tests.healthd.factories import job, random_job, rank, ranks_of, stored_job


@pytest.mark.parametrize(("norms", "expected"), [
    ([1.0, 1.2, 0.9, 1.1], []),
    ([1.0, 1.2, 30.0, 1.1], [2]),
    ([1.0, 1.2, 0.01, 1.1], [2]),
    ([1.0, 50.0], [0, 1]),  # two ranks: cannot tell which is wrong
])
def test_gradient_norm_mismatch(norms: list[float], expected: list[int]) -> None:
    found = GradientNormMismatch().evaluate(job(*[rank(i, grad_norm_local=v) for i, v in enumerate(norms)]))
    assert ranks_of(found) == expected


# ------------------------------------------------------------------ fast paths vs the direct computations
# The rule reads the store's columns (newest first, only as far back as it needs) and computes
# leave-one-out medians from one sort: each is checked against the direct computation, on random
# jobs through a real Store so that the column paths are the ones tested.


def test_leave_one_out_medians_match_the_direct_computation() -> None:
    rng = random.Random(1)
    for n in [2, 3, 4, 5, *rng.sample(range(6, 200), 20)]:
        for values in ([rng.gauss(1.0, 0.3) for _ in range(n)],
                       [float(rng.randint(0, 3)) for _ in range(n)],  # ties
                       [rng.choice([0.0, -0.0, 1e-300, 1.0, 1e300]) for _ in range(n)]):
            expected = [statistics.median(values[:i] + values[i + 1:]) for i in range(n)]
            assert repr(leave_one_out_medians(values)) == repr(expected), values


def _mismatch_direct(w: JobWindow, cfg: Any) -> list[tuple[int, float, float]]:
    medians = {}
    for rank_id, st in w.ranks.items():
        norms = finite([s.grad_norm_local for s in list(st.steps)[-cfg.window_steps:]])
        if not st.closed and len(norms) >= cfg.min_steps:
            medians[rank_id] = statistics.median(norms)
    found = []
    if len(medians) >= 2:
        for rank_id, m in sorted(medians.items()):
            others = statistics.median([v for r, v in medians.items() if r != rank_id])
            ratio = m / others if others > 0 else math.inf
            if not (others <= 0 and m <= 0) and (ratio > cfg.max_ratio or ratio < 1 / cfg.max_ratio):
                found.append((rank_id, m, others))
    return found


@pytest.mark.parametrize("seed", range(200))
def test_gradient_norm_mismatch_finds_what_the_direct_computation_finds(seed: int) -> None:
    rng = random.Random(seed)
    w = stored_job(random_job(rng))

    mismatch = GradientNormMismatch(GradientNormMismatch.Config(window_steps=rng.choice([1, 5, 20]), min_steps=1))
    got_m = [(f.rank, f.evidence["median_grad_norm_local"], f.evidence["others_median_grad_norm_local"])
             for f in mismatch.evaluate(w)]
    assert repr(got_m) == repr(_mismatch_direct(w, mismatch.config))
