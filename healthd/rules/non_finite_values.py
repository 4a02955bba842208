"""NonFiniteValues: NaN or Inf in the loss, gradients or parameters."""

from __future__ import annotations

import math
from typing import ClassVar

from healthd.rules.base import Finding, ResolveAfterSteps, Rule, RuleConfig, fmt
from healthd.state.windows import RankWindow
from healthd.wire.records import StepRecord
from healthd.wire.schema import Severity


def nonfinite_parts(s: StepRecord) -> tuple[bool, bool, bool]:
    """Whether the step's loss, gradients and parameters hold a NaN/Inf (the client's counts, or a
    non-finite loss or global gradient norm)."""
    return (s.nonfinite.loss > 0 or (s.loss is not None and not math.isfinite(s.loss)),
            s.nonfinite.grads > 0 or (s.grad_norm is not None and not math.isfinite(s.grad_norm)),
            s.nonfinite.params > 0)


class NonFiniteValuesConfig(RuleConfig):
    resolve_after_steps: ResolveAfterSteps = 50


class NonFiniteValues(Rule[RankWindow, NonFiniteValuesConfig]):
    """NaN or Inf appeared in the loss, the gradients or the parameters.

    Why: one NaN poisons every parameter it touches through the optimizer; a run
    that keeps stepping after it burns GPU hours for nothing. Fires at the step
    it appears (``for_steps=1``).

    Source: "numerical instability - inf/NaN", often from an exp, log or div
    operation, J. Tobin, "Troubleshooting Deep Neural Networks" (Full Stack Deep
    Learning, 2019); Goodfellow, Bengio & Courville, "Deep Learning" (MIT Press,
    2016), 4.1 "Overflow and Underflow".

    A step that mixed precision skipped (``step_skipped``) with non-finite
    gradients only is the GradScaler doing its job, not a finding; repeated skips
    are LossScaleCollapse's concern.
    """

    name: ClassVar[str] = "NonFiniteValues"
    severity: ClassVar[Severity] = Severity.CRITICAL
    Config = NonFiniteValuesConfig
    advice: ClassVar[str] = (
        "Lower the learning rate, add gradient clipping, and look for exp/log/div on unguarded values "
        "(log(0), division by a zero variance). Check the input batch for NaN. With fp16, use a GradScaler "
        "or switch to bf16. Restart from the last checkpoint before the step shown."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        for s in window.new:  # the first poisoned step among those that just arrived: the onset
            loss_bad, grads_bad, params_bad = nonfinite_parts(s)
            if s.step_skipped and grads_bad and not (loss_bad or params_bad):
                continue  # AMP skipped it: LossScaleCollapse watches those
            if loss_bad or grads_bad or params_bad:
                return self._finding(window, s, loss_bad, grads_bad, params_bad)
        return None

    @staticmethod
    def _finding(window: RankWindow, s: StepRecord, loss_bad: bool, grads_bad: bool, params_bad: bool) -> Finding:
        where = [n for n, bad in (("loss", loss_bad), ("gradients", grads_bad), ("parameters", params_bad)) if bad]
        bad_layers = sorted(n for n, ls in s.layers.items()
                            if ls.grad_norm is not None and not math.isfinite(ls.grad_norm))
        return Finding(
            summary=(f"Non-finite values in {', '.join(where)} at step {s.step} (rank {window.rank}); "
                     f"loss={fmt(s.loss)}"),
            evidence={
                "step": s.step,
                "loss": s.loss,
                "grad_norm": s.grad_norm,
                "nonfinite_loss": s.nonfinite.loss,
                "nonfinite_grad_tensors": s.nonfinite.grads,
                "nonfinite_param_tensors": s.nonfinite.params,
                "first_bad_layer": bad_layers[0] if bad_layers else None,
            },
            step=s.step,
            rank=window.rank,
            layer=bad_layers[0] if bad_layers else None,
        )
