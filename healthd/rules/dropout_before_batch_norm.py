"""DropoutBeforeBatchNorm: a dropout layer feeds a batch-norm layer (found at attach)."""

from __future__ import annotations

from typing import ClassVar

from healthd.rules.base import Finding, Rule, RuleConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class DropoutBeforeBatchNorm(Rule[RankWindow, RuleConfig]):
    """The model has a dropout layer directly followed by a batch-norm layer.

    Why: dropout changes the variance of its output between training and
    inference; batch norm after it learns running statistics under dropout's
    training-time variance and applies them at inference, where dropout is off:
    the "variance shift" that makes the combination perform worse than either.
    Source: Li et al. 2019, "Understanding the Disharmony between Dropout and
    Batch Normalization by Variance Shift" (CVPR 2019), as cited in C. Shao,
    "Checklist for debugging neural networks" (Towards Data Science, 2019).
    Signal: the client's static check at attach (consecutive children of a
    container, in registration order). No threshold: the structure is the finding.
    """

    name: ClassVar[str] = "DropoutBeforeBatchNorm"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = RuleConfig  # no thresholds: the structure is the finding
    advice: ClassVar[str] = (
        "Move dropout after the last batch-norm layer (e.g. only before the classifier head), or drop one of "
        "the two; Li et al. 2019 suggest dropout after all BN layers or a variance-stable dropout."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        attach = window.meta.attach
        s = window.latest
        if attach is None or s is None:
            return None
        hits = [f for f in attach.static_findings if f.check == "dropout_before_batchnorm"]
        if not hits:
            return None
        return Finding(
            summary=(f"Dropout feeds batch norm at {hits[0].layer or '?'} ({hits[0].detail or 'static check'}); "
                     f"{len(hits)} place(s) in the model: batch norm's running variance will not match inference"),
            evidence={"step": s.step, "places": len(hits), "layer_name": hits[0].layer, "detail": hits[0].detail},
            step=s.step,
            rank=window.rank,
            layer=hits[0].layer,
        )
