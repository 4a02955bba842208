"""SoftmaxBeforeLoss: probabilities given to a loss that expects logits, or non-log-probabilities to nll_loss."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Hints, LookbackSteps, Rule, SampledConfig, poisoned
from healthd.state.windows import RankWindow
from healthd.wire.records import LossInputRecord
from healthd.wire.schema import Severity

_LOGIT_LOSSES = ("cross_entropy",)
_LOG_PROB_LOSSES = ("nll_loss",)
_BINARY_LOGIT_LOSSES = ("binary_cross_entropy_with_logits",)


class SoftmaxBeforeLossConfig(SampledConfig):
    lookback_steps: LookbackSteps = Field(default=50, description="how far back the last inspected loss call may be")


def _problem(c: LossInputRecord) -> tuple[str, Severity] | None:
    if c.fn in _LOGIT_LOSSES:
        if c.rows_sum_to_one:
            return "its input rows are probabilities (they sum to 1): softmax was applied before a loss that " \
                   "applies log_softmax itself", Severity.WARNING
        if c.all_non_negative:
            return "its input is all non-negative (probabilities normalised over another dim, e.g. softmax over " \
                   "the batch, or a ReLU on the logits)", Severity.WARNING
    if c.fn in _LOG_PROB_LOSSES:
        if not c.all_non_positive:
            return "its input is not log-probabilities (some values > 0): nll_loss needs log_softmax outputs", \
                Severity.WARNING
        if not c.rows_sum_to_one:
            return "its input is log-probabilities that do not normalise over the class dim (log_softmax over " \
                   "the wrong dim?)", Severity.WARNING
    if c.fn in _BINARY_LOGIT_LOSSES and c.all_non_negative:
        return "its input is all non-negative (sigmoid applied before a loss that applies it itself?)", \
            Severity.INFO
    return None


class SoftmaxBeforeLoss(Rule[RankWindow, SoftmaxBeforeLossConfig]):
    """A loss that expects logits got probabilities, or ``nll_loss`` got something other than log-probabilities.

    Why: ``cross_entropy`` applies log_softmax itself; given probabilities it
    computes a squashed loss whose gradients are tiny and badly scaled, so the
    model learns slowly or not at all, with no error. ``nll_loss`` on raw
    probabilities or logits is simply a different (wrong) objective.
    Source: "passed softmaxed outputs to a loss that expects raw logits", A.
    Karpathy's list of common neural net mistakes, and "softmax taken over wrong
    dimension", both in J. Tobin, "Troubleshooting Deep Neural Networks" (Full
    Stack Deep Learning, 2019). The client inspects the inputs of sampled loss calls
    (loss modules and the functional API through a TorchFunctionMode).
    Thresholds: cross_entropy input rows summing to 1 (|sum - 1| < 1e-3) or all
    values >= 0 (a batch of real logits is never all non-negative); nll_loss
    input with values > 0, or whose exp does not sum to 1 over dim 1.
    ``binary_cross_entropy_with_logits`` on all-non-negative values is only an
    ``info`` (a model sure of the positive class can produce that legitimately).
    Silent once NaN/Inf reached the run (any step in the lookback up to the
    inspected one): NaN inputs fail every check, and NonFiniteValues owns that.
    """

    name: ClassVar[str] = "SoftmaxBeforeLoss"
    severity: ClassVar[Severity] = Severity.WARNING
    hints: ClassVar[Hints] = Hints(reads=("loss_inputs",))
    Config = SoftmaxBeforeLossConfig
    advice: ClassVar[str] = (
        "Pass raw logits to cross_entropy / CrossEntropyLoss / BCEWithLogitsLoss (remove the softmax/sigmoid); "
        "use log_softmax(dim=1) (the class dim) before nll_loss; if you need probabilities, compute them "
        "separately for metrics."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        # The last inspected loss call of a sound step: inputs poisoned by NaN/Inf are neither
        # probabilities nor log-probabilities, and NonFiniteValues already pages for them.
        recent = window.last(self.config.lookback_steps)
        s = next((s for s in reversed(recent) if s.loss_inputs), None)
        if s is None or poisoned(s) or any(poisoned(r) for r in recent if r.step <= s.step):
            return None
        for c in s.loss_inputs:
            problem = _problem(c)
            if problem is None:
                continue
            text, severity = problem
            return Finding(
                summary=f"{c.fn} at step {s.step} (rank {window.rank}): {text}; input shape {c.input_shape}",
                evidence={"step": s.step, "fn": c.fn, "input_shape": str(c.input_shape),
                          "rows_sum_to_one": c.rows_sum_to_one, "all_non_negative": c.all_non_negative,
                          "all_non_positive": c.all_non_positive},
                step=s.step,
                rank=window.rank,
                severity=severity,
            )
        return None
