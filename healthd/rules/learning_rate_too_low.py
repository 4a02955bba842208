"""LearningRateTooLow: updates so small relative to the weights that training barely moves."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ForSteps,
    Hints,
    Rule,
    WindowedConfig,
    fmt,
    gradless_layers,
    median,
    oversized_updates,
)
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class LearningRateTooLowConfig(WindowedConfig):
    window_steps: int = Field(default=50, ge=5, description="steps whose median update ratio is judged")
    min_update_ratio: float = Field(default=1e-5, gt=0, description="median ||dw||/||w|| below which it warns")
    steady_lr_factor: float = Field(
        default=1.5, gt=1, description="max/min LR over the window above which a schedule is moving (skip)"
    )
    peak_fraction: float = Field(
        default=0.5, gt=0, le=1, description="skip when the LR has decayed below this fraction of its peak"
    )
    for_steps: ForSteps = 10
    min_samples: int = Field(default=3, ge=1, description="sampled update ratios needed in the window")
    diverged_loss_factor: float = Field(
        default=2.0, gt=1, description="skip when the recent loss is this many times the initial loss (diverged)")
    oversized_update_ratio: float = Field(
        default=0.1, gt=0, description="skip when a median of min_samples update ratios ever reached this (too high)")
    vanished_grad_rms: float = Field(
        default=1e-7, gt=0, description="skip when the gradient's per-element RMS is below this (vanished)")


class LearningRateTooLow(Rule[RankWindow, LearningRateTooLowConfig]):
    """Gradients are present but each update is a tiny fraction of the weights.

    Why: a learning rate orders of magnitude too low wastes the run: the loss
    creeps down and the job "converges" to a poor result days later.

    Source: ||dw||/||w|| ~ 1e-3, Stanford CS231n notes "Neural Networks Part 3:
    Learning and Evaluation"; "if your gradient values are zero, it could mean
    that the learning rate might be too small", C. Shao, "Checklist for
    debugging neural networks" (Towards Data Science, 2019). Threshold:
    ``min_update_ratio`` 1e-5 (100x below the rule of thumb), median over
    ``window_steps``. Warm-up and decay phases are skipped: the rule judges only
    while the LR is steady (max/min over the window < ``steady_lr_factor``) and
    at least ``peak_fraction`` of the highest LR seen, so a cosine tail or a
    warm-up start is never called too low. A run whose loss is
    ``diverged_loss_factor`` times above where it started is not too slow: it
    blew up, its weights grew huge and every update looks tiny next to them
    (that is LossDiverging's and ExplodingGradients' finding, not this one).
    Tiny updates are the damage, not the cause, when gradients stopped flowing
    (a layer gets no gradient, or the gradient's per-element RMS is below
    ``vanished_grad_rms``) or when the run earlier showed oversized updates
    (a median of ``min_samples`` ratios at ``oversized_update_ratio``, the
    warning level of LearningRateTooHigh): a network a high LR killed moves no
    weights. The rule stays silent then.
    """

    name: ClassVar[str] = "LearningRateTooLow"
    severity: ClassVar[Severity] = Severity.WARNING
    hints: ClassVar[Hints] = Hints(reads=("update_ratio",))
    Config = LearningRateTooLowConfig
    advice: ClassVar[str] = (
        "Raise the learning rate (try 3-10x), or run a learning-rate range test. The update-to-weight ratio "
        "should be around 1e-3 (CS231n). Also check that gradients reach every layer."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        # Every test below must pass; the one that fails in a healthy run (the ratio) goes first.
        ratios = window.values("update_ratio", cfg.window_steps)
        if len(ratios) < cfg.min_samples:
            return None
        med = median(ratios)
        if med <= 0 or med >= cfg.min_update_ratio:
            return None  # exactly zero is WeightsNotUpdating's finding
        if len(window.column("step", cfg.window_steps)) < cfg.window_steps:
            return None
        lrs = window.values("lr", cfg.window_steps)
        if len(lrs) < cfg.window_steps or min(lrs) <= 0:
            return None
        if max(lrs) / min(lrs) > cfg.steady_lr_factor:
            return None
        if window.lr_peak is not None and lrs[-1] < cfg.peak_fraction * window.lr_peak:
            return None
        norms = window.values("grad_norm", cfg.window_steps)
        if not norms or median(norms) <= 0:
            return None
        initial = window.initial_values("loss")
        recent = window.values("loss", 10)
        if initial and recent and median(recent) > cfg.diverged_loss_factor * abs(median(initial)):
            return None
        s = window.steps[-1]
        if gradless_layers(s):
            return None  # gradients stopped flowing: GradientsNotFlowing's finding
        attach = window.meta.attach
        n_params = attach.model.trainable_count if attach and attach.model else 0
        if n_params > 0 and median(norms) / math.sqrt(n_params) < cfg.vanished_grad_rms:
            return None  # VanishingGradients' finding
        if oversized_updates(window, cfg.oversized_update_ratio, cfg.min_samples) is not None:
            return None  # the damage of a learning rate that was too high
        return Finding(
            summary=(f"Update-to-weight ratio {fmt(med)} (median of {len(ratios)} steps) is "
                     f"{1e-3 / med:.0f}x below the ~1e-3 rule of thumb at lr={fmt(lrs[-1])} (rank {window.rank})"),
            evidence={"step": s.step, "median_update_ratio": med, "lr": lrs[-1], "median_grad_norm": median(norms)},
            step=s.step,
            rank=window.rank,
        )
