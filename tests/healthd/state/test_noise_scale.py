"""The noise-scale estimator against linear regression, whose gradient noise is known in closed form.

Model: y = x·w* + ε with x ~ N(0, I_d), ε ~ N(0, σ²), per-example loss ½(x·w - y)².
At w = w* + δ the per-example gradient is g = x xᵀ δ - x ε, so (Isserlis)
G = E[g] = δ and Σ = Cov[g] = (|δ|² + σ²) I + δ δᵀ, hence
tr(Σ) = d (|δ|² + σ²) + |δ|² and B_simple = tr(Σ) / |δ|².
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from healthd.state.noise_scale import NoiseScaleEstimator, unbiased_estimates


def closed_form(delta: np.ndarray, sigma2: float) -> tuple[float, float]:
    d2 = float(delta @ delta)
    trace = len(delta) * (d2 + sigma2) + d2
    return trace, d2


def simulate(est: NoiseScaleEstimator, *, steps: int, ranks: int, b_small: int, d: int, delta: np.ndarray,
             sigma2: float, seed: int) -> None:
    """What DDP gives healthd: per rank, |mean grad over its batch|² and |mean over all ranks' batches|²."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = rng.standard_normal((ranks, b_small, d))
        eps = rng.standard_normal((ranks, b_small)) * math.sqrt(sigma2)
        resid = x @ delta - eps  # (ranks, b_small)
        per_rank = (x * resid[..., None]).mean(axis=1)  # local gradients, (ranks, d)
        big = per_rank.mean(axis=0)  # the all-reduced (averaged) gradient
        g_big_sq = float(big @ big)
        for r in range(ranks):
            est.update(float(per_rank[r] @ per_rank[r]), g_big_sq, b_small, b_small * ranks)


@pytest.mark.parametrize(("d", "sigma2", "ranks", "b_small"), [(10, 1.0, 2, 8), (20, 4.0, 4, 16)])
def test_matches_closed_form_linear_regression(d: int, sigma2: float, ranks: int, b_small: int) -> None:
    delta = np.full(d, 1.0 / math.sqrt(d))  # |δ|² = 1
    trace, g2 = closed_form(delta, sigma2)
    est = NoiseScaleEstimator(alpha=0.002, min_samples=10)
    simulate(est, steps=3000, ranks=ranks, b_small=b_small, d=d, delta=delta, sigma2=sigma2, seed=d)
    expected = trace / g2  # 21 and 101
    assert est.noise_scale is not None
    # Stated tolerance: 15% (the EMA over ~1000 effective samples has a few % standard error).
    assert est.noise_scale == pytest.approx(expected, rel=0.15)
    assert est.trace_cov == pytest.approx(trace, rel=0.15)
    assert est.grad_sq == pytest.approx(g2, rel=0.15)


def test_ratio_of_averages_not_average_of_ratios() -> None:
    # Two steps whose |G|² estimates are +1 and -0.5: the per-step ratio is meaningless for the second,
    # the smoothed ratio is not.
    est = NoiseScaleEstimator(alpha=0.5, min_samples=2)
    e1 = unbiased_estimates(2.0, 1.25, 1, 4)
    assert e1.grad_sq == pytest.approx(1.0) and e1.trace_cov == pytest.approx(1.0)
    est.update(2.0, 1.25, 1, 4)
    est.update(2.0, 1.25, 1, 4)
    assert est.noise_scale == pytest.approx(1.0)


def test_needs_min_samples_and_positive_grad_sq() -> None:
    est = NoiseScaleEstimator(alpha=0.1, min_samples=3)
    assert est.noise_scale is None and est.grad_sq is None
    est.update(2.0, 1.25, 1, 4)
    assert est.noise_scale is None  # one sample < min_samples
    est2 = NoiseScaleEstimator(alpha=1.0, min_samples=1)
    est2.update(1.0, 1.0, 1, 4)  # |G_small|² == |G_big|²: no noise, |G|² = 1
    assert est2.noise_scale == 0.0
    est3 = NoiseScaleEstimator(alpha=1.0, min_samples=1)
    est3.update(4.0, 0.0, 1, 4)  # |G|² estimate negative: no value rather than a negative scale
    assert est3.noise_scale is None


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="b_small"):
        unbiased_estimates(1.0, 1.0, 4, 4)
    with pytest.raises(ValueError, match="alpha"):
        NoiseScaleEstimator(alpha=0)
    est = NoiseScaleEstimator(alpha=0.5, min_samples=1)
    assert not est.update(math.nan, 1.0, 1, 2)
    assert not est.update(1.0, 1.0, 2, 2)
    assert est.samples == 0
