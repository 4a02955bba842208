"""SaturatedActivations: sigmoid/tanh units stuck in their flat regions."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    Hints,
    LookbackSteps,
    Rule,
    SampledConfig,
    fmt,
    worst_activation_layer,
)
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class SaturatedActivationsConfig(SampledConfig):
    lookback_steps: LookbackSteps = Field(default=100, description="steps searched for sampled activation statistics")
    samples: int = Field(default=2, ge=1, description="latest samples that must all agree")
    saturated_fraction: float = Field(default=0.5, gt=0, le=1, description="fraction of saturated units that warns")


class SaturatedActivations(Rule[RankWindow, SaturatedActivationsConfig]):
    """In a sigmoid/tanh layer, more than ``saturated_fraction`` of the units sit in the flat region.

    Why: in the flat region the derivative is ~0 (sigmoid' < 0.02, tanh' < 0.04),
    so gradients through the layer vanish and it stops learning; usually too
    large initial weights or unnormalised inputs.
    Source: Stanford CS231n notes "Neural Networks Part 1: Setting up the
    Architecture" (sigmoids saturate and kill gradients); Glorot & Bengio,
    "Understanding the difficulty of training deep feedforward neural networks"
    (AISTATS 2010). The client's sampled forward hook marks
    an element flat when sigmoid output is < 0.02 or > 0.98, or |tanh| > 0.98,
    and a unit saturated when it is flat for >= 90% of the batch. Threshold:
    > 0.5 of a layer's units saturated in each of the latest ``samples`` (2).
    """

    name: ClassVar[str] = "SaturatedActivations"
    severity: ClassVar[Severity] = Severity.WARNING
    hints: ClassVar[Hints] = Hints(reads=("activations",))
    Config = SaturatedActivationsConfig
    advice: ClassVar[str] = (
        "Use Xavier/Glorot initialisation for sigmoid/tanh layers, normalise the inputs, add batch/layer norm "
        "before the activation, or switch hidden layers to ReLU-family activations."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        worst = worst_activation_layer(window, kinds=("sigmoid", "tanh"), attr="saturated_fraction",
                                       threshold=cfg.saturated_fraction, lookback_steps=cfg.lookback_steps,
                                       samples=cfg.samples)
        if worst is None:
            return None
        layer, fraction, sampled = worst
        s = window.steps[-1]
        return Finding(
            summary=(f"{fmt(100 * fraction)}% of the units of {layer} are saturated (flat region) over the sampled "
                     f"batch (up to step {sampled[-1].step}, rank {window.rank}): their gradients vanish"),
            evidence={"step": s.step, "layer_name": layer, "saturated_fraction": fraction, "samples": len(sampled)},
            step=s.step,
            rank=window.rank,
            layer=layer,
        )
