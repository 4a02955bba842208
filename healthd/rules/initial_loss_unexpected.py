"""InitialLossUnexpected: the first losses are far from the chance level ln(C)."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Rule, RuleConfig, fmt, median, series
from healthd.state.windows import RankWindow, finite
from healthd.wire.schema import Severity


class InitialLossUnexpectedConfig(RuleConfig):
    first_steps: int = Field(default=3, ge=1, description="first losses whose median is compared with chance")
    warn_factor: float = Field(default=2.0, gt=1, description="initial/chance ratio (or its inverse) that warns")
    info_factor: float = Field(default=1.5, gt=1, description="initial/chance ratio (or its inverse) worth an info")
    report_until_step: int = Field(default=200, ge=1, description="stop reporting (resolve) after this step")


class InitialLossUnexpected(Rule[RankWindow, InitialLossUnexpectedConfig]):
    """The median of the first ``first_steps`` losses is far from ln(C), the loss of a uniform guess over C classes.

    Why: at initialisation a classifier should be unsure; a first loss far above
    ln(C) means a badly scaled output layer or initialisation (overconfident
    wrong guesses), far below means the labels leak into the input or the loss
    is not what you think.
    Source: A. Karpathy, "A Recipe for Training Neural Networks" (2019): "verify
    loss @ init", -log(1/n_classes); Stanford CS231n notes "Neural Networks Part
    3: Learning and Evaluation": "look for correct loss at chance performance".
    Only for cross-entropy-style losses: C comes from ``num_classes=`` or from the
    second dim of the inspected cross_entropy/nll_loss input. Thresholds:
    ratio > ``warn_factor`` (2x) or < 1/2 warns; beyond ``info_factor`` (1.5x)
    informs. Reported until ``report_until_step``, then it resolves.
    """

    name: ClassVar[str] = "InitialLossUnexpected"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = InitialLossUnexpectedConfig
    advice: ClassVar[str] = (
        "Check the output layer's initialisation (small weights, zero or prior-matching bias), that no "
        "activation follows the logits, that the loss is computed on the right tensors, and that labels do "
        "not leak into the inputs. Expect ln(C) for C balanced classes at step 0."
    )

    def _classes(self, window: RankWindow) -> int | None:
        if window.meta.num_classes:
            return window.meta.num_classes
        for s in (*window.initial_steps, *window.last(20)):
            for c in s.loss_inputs:
                if c.fn in ("cross_entropy", "nll_loss") and len(c.input_shape) >= 2 and c.input_shape[1] >= 2:
                    return c.input_shape[1]
        return None

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        s = window.latest
        if s is None or window.new[0].step > cfg.report_until_step:
            return None  # judged while the first steps arrive (they may all arrive in one request)
        first = window.initial_steps[:cfg.first_steps]
        losses = finite(series(first, "loss"))
        if len(losses) < cfg.first_steps:
            return None
        classes = self._classes(window)
        if classes is None or classes < 2:
            return None
        chance = math.log(classes)
        initial = median(losses)
        ratio = initial / chance
        off = max(ratio, 1 / ratio) if ratio > 0 else math.inf
        if off < cfg.info_factor:
            return None
        return Finding(
            summary=(f"Initial loss {fmt(initial)} (median of the first {len(losses)} steps) is {fmt(ratio)}x "
                     f"the chance level ln({classes}) = {fmt(chance)} (rank {window.rank})"),
            evidence={"step": first[0].step, "initial_loss": initial, "chance_loss": chance, "classes": classes,
                      "ratio": ratio},
            step=s.step,
            rank=window.rank,
            severity=None if off >= cfg.warn_factor else Severity.INFO,
        )
