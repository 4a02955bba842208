"""LossPlateau: no progress over a long window, relative to the loss's own noise."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ForSteps,
    Rule,
    WindowedConfig,
    fmt,
    median,
    sound_steps,
    trained_start,
)
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class LossPlateauConfig(WindowedConfig):
    window_steps: int = Field(default=30, ge=10, description="steps over which progress is judged")
    edge_steps: int = Field(default=10, ge=2, description="losses per median at each end of the window")
    noise_multiple: float = Field(default=1.0, gt=0, description="progress below this many standard errors counts")
    diverged_loss_factor: float = Field(
        default=2.0, gt=1, description="a loss this many times its initial level has diverged, not plateaued")
    stuck_fraction: float = Field(
        default=0.95, gt=0, description="warn only while the loss is above this fraction of its initial level"
    )
    lr_decayed_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="a learning rate below this fraction of the run's peak is the end of "
        "a decaying schedule: the loss flattens by design (no finding)")
    lr_annealing_fraction: float = Field(
        default=0.25, ge=0, lt=1, description="a learning rate still falling across the window and below this "
        "fraction of the run's peak is the last stretch of a decaying schedule too (no finding)")
    for_steps: ForSteps = 3


class LossPlateau(Rule[RankWindow, LossPlateauConfig]):
    """Over ``window_steps`` the loss fell by less than its own noise; a warning when it never left its start.

    Why: a flat loss means nothing is being learned: learning rate too low,
    gradients not reaching the weights, too much regularisation, or labels that
    carry no signal (corrupted/shuffled). A plateau late in training is usually
    convergence, so that case is only an ``info``.
    Source: "error plateaus: learning rate too low, gradients not flowing
    through the whole model, too much regularization, incorrect input to loss,
    data or label error", J. Tobin, "Troubleshooting Deep Neural Networks" (Full
    Stack Deep Learning, 2019). Thresholds:
    median of the first ``edge_steps`` (10) losses of the window minus the
    median of the last 10 is below ``noise_multiple`` (1) x the standard error
    of that difference (from the window's median |step-to-step change|); warning
    while the loss is above ``stuck_fraction`` (0.95) of its initial level (near
    it, not a nat below it), info otherwise. Not a plateau: a loss that flattens
    while the learning rate schedule decays towards zero (the window's last
    learning rate below ``lr_decayed_fraction`` (0.1) of the run's peak, or still
    falling across the window and below ``lr_annealing_fraction`` (0.25) of it: the
    end of a cosine or linear schedule), and a fine-tune's slow loss (it starts from
    trained weights, so slow progress near its initial level is its normal course;
    info at most). A run is a fine-tune by the attach hint ``fine_tune`` or, when
    nothing told healthd (a plain ``load_state_dict`` before training), by its
    step-0 loss below 2/3 of chance ln(C) for a C-class cross-entropy loss
    (``healthd.rules.base.trained_start``).

    Not for a stream whose loss training does not drive down (the attach hint ``loss_kind="adversarial"``:
    a GAN's generator or discriminator loss rises whenever the other player improves): not judged.
    """

    name: ClassVar[str] = "LossPlateau"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = LossPlateauConfig
    advice: ClassVar[str] = (
        "Check the learning rate (range test), that gradients reach every layer, the regularisation strength "
        "(weight decay, dropout), and the labels (overfit a single batch first: if that fails, the pipeline "
        "or the model is broken). If the run has converged, stop it or decay the learning rate."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        if not window.meta.loss_minimized:
            return None  # an adversarial loss (a GAN player's) has no shape to judge
        cfg = self.config
        losses = window.values("loss", sound_steps(window, cfg.window_steps))  # since any NaN
        if len(losses) < cfg.window_steps:
            return None
        k = cfg.edge_steps
        head, tail = median(losses[:k]), median(losses[-k:])
        swings = [abs(b - a) for a, b in zip(losses, losses[1:], strict=False)]
        # |L_t - L_{t-1}| of iid noise has median ~0.95 sigma; a median of k has s.e. ~1.25 sigma / sqrt(k)
        sigma = median(swings) / 0.95
        stderr = 1.25 * sigma * math.sqrt(2.0 / k)
        progress = head - tail
        if progress >= cfg.noise_multiple * stderr and progress > 1e-12 * abs(head):
            return None
        lrs = window.values("lr", len(losses))
        if lrs and window.lr_peak and (lrs[-1] < cfg.lr_decayed_fraction * window.lr_peak or (
                lrs[-1] < cfg.lr_annealing_fraction * window.lr_peak and lrs[-1] < lrs[0])):
            return None  # the schedule is annealing: flattening is what it is for
        initial = window.initial_values("loss", k)
        start = median(initial) if initial else head
        if start > 0 and tail > cfg.diverged_loss_factor * start:
            return None  # flat far above where it started: a blown-up run, LossDiverging's finding
        stuck = start > 0 and tail >= cfg.stuck_fraction * start and trained_start(window) is None
        s = window.steps[-1]
        return Finding(
            summary=(f"Loss has plateaued at {fmt(tail)}: {fmt(progress)} progress over the last {len(losses)} "
                     f"steps vs noise {fmt(stderr)}" + (f", still near its initial {fmt(start)}" if stuck else "")
                     + f" (step {s.step}, rank {window.rank})"),
            evidence={"step": s.step, "loss_head": head, "loss_tail": tail, "progress": progress,
                      "noise_stderr": stderr, "loss_initial": start},
            step=s.step,
            rank=window.rank,
            severity=None if stuck else Severity.INFO,
        )
