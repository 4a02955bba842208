"""Overfitting: validation loss rising while training loss falls, with a growing gap."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Rule, RuleConfig, fmt, median
from healthd.state.windows import RankWindow, finite
from healthd.wire.schema import EvalReport, Severity


class OverfittingConfig(RuleConfig):
    min_evals: int = Field(default=3, ge=2, description="validation passes needed before judging")
    rise_fraction: float = Field(default=0.1, gt=0, description="val loss rise above its best, relative, that counts")
    gap_ratio: float = Field(default=0.1, gt=0, description="(val - train) / train that counts (SageMaker default)")
    train_steps: int = Field(default=10, ge=1, description="training losses up to an eval's step whose median is "
                             "its training loss")


class Overfitting(Rule[RankWindow, OverfittingConfig]):
    """Validation loss rose above its best while the training loss kept falling, and the gap exceeds ``gap_ratio``.

    Why: the model is memorising the training set instead of generalising
    (variance dominates the bias-variance trade-off); every further step makes
    the deployed model worse.
    Source: the bias-variance decomposition in J. Tobin, "Troubleshooting Deep
    Neural Networks" (Full Stack Deep Learning, 2019) ("add data or regularize
    if overfit"); SageMaker Debugger's
    Overfit ((val - train)/train > 0.1). That ratio alone flags most healthy runs
    (val loss is nearly always above train loss), so the warning also needs the
    validation loss to have risen ``rise_fraction`` (10%) above its best in the
    last two passes while the training loss fell since that best. A gap above
    0.1 that grew over the last ``min_evals`` passes without a val rise is an info.
    """

    name: ClassVar[str] = "Overfitting"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = OverfittingConfig
    advice: ClassVar[str] = (
        "Stop early (keep the checkpoint with the best validation loss), add regularisation (weight decay, "
        "dropout, data augmentation), get more data, or use a smaller model."
    )

    def _train_loss(self, window: RankWindow, e: EvalReport) -> float | None:
        upto = [v for st, v in zip(window.column("step"), window.column("loss"), strict=True)
                if st is not None and st <= e.step]
        losses = finite(upto[-self.config.train_steps:])
        return median(losses) if losses else None

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        evals = [e for e in window.evals if e.loss is not None]
        if len(evals) < cfg.min_evals:
            return None
        best_i = min(range(len(evals)), key=lambda i: evals[i].loss or 0.0)
        best, last = evals[best_i], evals[-1]
        assert best.loss is not None and last.loss is not None
        train_best, train_last = self._train_loss(window, best), self._train_loss(window, last)
        if train_last is None or train_last <= 0:
            return None
        gap = (last.loss - train_last) / train_last
        recent = evals[-2:]
        rising = best_i < len(evals) - 2 and all(e.loss is not None and e.loss > best.loss * (1 + cfg.rise_fraction)
                                                 for e in recent)
        train_falling = train_best is not None and train_last < train_best
        s = window.steps[-1] if window.steps else None
        step = s.step if s else last.step
        evidence = {"step": step, "eval_step": last.step, "val_loss": last.loss, "val_loss_best": best.loss,
                    "best_eval_step": best.step, "train_loss": train_last, "gap_ratio": gap}
        if rising and train_falling and gap > cfg.gap_ratio:
            return Finding(
                summary=(f"Overfitting: validation loss {fmt(last.loss)} at step {last.step} is "
                         f"{fmt(100 * (last.loss / best.loss - 1))}% above its best {fmt(best.loss)} (step "
                         f"{best.step}) while training loss fell to {fmt(train_last)}; gap {fmt(100 * gap)}%"),
                evidence=evidence, step=step, rank=window.rank,
            )
        gaps = []
        for e in evals[-cfg.min_evals:]:
            t = self._train_loss(window, e)
            if t is None or t <= 0 or e.loss is None:
                return None
            gaps.append((e.loss - t) / t)
        if gaps[-1] > cfg.gap_ratio and all(b > a for a, b in zip(gaps, gaps[1:], strict=False)):
            return Finding(
                summary=(f"Train/validation gap is growing: {', '.join(fmt(100 * g) + '%' for g in gaps)} over the "
                         f"last {len(gaps)} validation passes (val loss {fmt(last.loss)}, train {fmt(train_last)})"),
                evidence=evidence, step=step, rank=window.rank, severity=Severity.INFO,
            )
        return None
