"""The simple gradient noise scale B_simple = tr(Σ) / |G|², estimated from DDP ranks.

Source: McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A.1. Two gradient estimates of the same step
at two batch sizes give unbiased estimates of |G|² and tr(Σ):

    |G|²  ≈ (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small)
    tr(Σ) ≈ (|G_small|² - |G_big|²) / (1/B_small - 1/B_big)

Under DDP they come for free: |G_small|² is a rank's local (pre-all-reduce)
squared gradient norm over its ``B_small`` examples, |G_big|² the squared norm
of the all-reduced (averaged) gradient over ``B_big = B_small * world_size``.
Each estimate is very noisy, so tr(Σ) and |G|² are smoothed separately (an
exponential moving average of each, which keeps them unbiased) and only then
divided, as the paper recommends: the ratio of averages, not the average of
ratios.

What lives here: pure math and one small smoothing state object. What does
not: where the norms come from (the client's DDP comm hook) or the rule that
uses B_simple (``LargeBatchGeneralization``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class NoiseEstimate:
    """One step's unbiased estimates (either may be negative: they are noisy)."""

    grad_sq: float  # |G|²: squared norm of the true gradient
    trace_cov: float  # tr(Σ): per-example gradient covariance trace


def unbiased_estimates(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> NoiseEstimate:
    """McCandlish et al. 2018 eq. A.2/A.3 from one pair of squared gradient norms.

    ``g_small_sq`` is |G_{B_small}|², the squared norm of the mean gradient
    over ``b_small`` examples; ``g_big_sq`` the same over ``b_big`` examples.
    Raises ``ValueError`` unless ``0 < b_small < b_big``.
    """
    if not (0 < b_small < b_big):
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_cov = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimate(grad_sq=grad_sq, trace_cov=trace_cov)


class NoiseScaleEstimator:
    """Exponential moving averages of tr(Σ) and |G|², and their ratio B_simple.

    ``alpha`` is the EMA weight of a new estimate (0 < alpha <= 1); the
    averages are bias-corrected for their start at zero (as Adam does), so the
    first estimate is not pulled towards 0. ``min_samples`` estimates are
    needed before ``noise_scale`` returns a value (default ``3 / alpha``: the
    EMA has then forgotten 95 % of its start; single estimates are noisy
    enough that a handful of them can be off by several times).
    """

    __slots__ = ("alpha", "min_samples", "samples", "_grad_sq", "_trace_cov", "_weight")

    def __init__(self, alpha: float = 0.05, min_samples: int | None = None) -> None:
        if not (0 < alpha <= 1):
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if min_samples is None:
            min_samples = math.ceil(3 / alpha)
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.alpha = alpha
        self.min_samples = min_samples
        self.samples = 0
        self._grad_sq = 0.0
        self._trace_cov = 0.0
        self._weight = 0.0  # 1 - (1 - alpha)^samples: the bias correction

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> bool:
        """Fold in one pair of squared norms; returns False (and ignores it) when unusable."""
        if not (math.isfinite(g_small_sq) and math.isfinite(g_big_sq)) or g_small_sq < 0 or g_big_sq < 0:
            return False
        if not (0 < b_small < b_big):
            return False
        est = unbiased_estimates(g_small_sq, g_big_sq, b_small, b_big)
        a = self.alpha
        self._grad_sq = (1 - a) * self._grad_sq + a * est.grad_sq
        self._trace_cov = (1 - a) * self._trace_cov + a * est.trace_cov
        self._weight = (1 - a) * self._weight + a
        self.samples += 1
        return True

    @property
    def grad_sq(self) -> float | None:
        """Smoothed |G|² (bias-corrected), or None before any sample."""
        return self._grad_sq / self._weight if self._weight > 0 else None

    @property
    def trace_cov(self) -> float | None:
        """Smoothed tr(Σ) (bias-corrected), or None before any sample."""
        return self._trace_cov / self._weight if self._weight > 0 else None

    @property
    def noise_scale(self) -> float | None:
        """B_simple = tr(Σ)/|G|² in examples, or None (too few samples, or |G|² not positive yet)."""
        if self.samples < self.min_samples:
            return None
        g, s = self.grad_sq, self.trace_cov
        if g is None or s is None or g <= 0 or s < 0:
            return None
        return s / g
