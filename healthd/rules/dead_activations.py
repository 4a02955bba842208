"""DeadActivations: most units of a ReLU layer never activate (dying ReLU)."""

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


class DeadActivationsConfig(SampledConfig):
    lookback_steps: LookbackSteps = Field(default=100, description="steps searched for sampled activation statistics")
    samples: int = Field(default=2, ge=1, description="latest samples that must all agree")
    dead_fraction: float = Field(default=0.5, gt=0, le=1, description="fraction of dead units in a layer that warns")
    critical_fraction: float = Field(default=0.9, gt=0, le=1, description="fraction that is critical")


class DeadActivations(Rule[RankWindow, DeadActivationsConfig]):
    """In a ReLU-family layer, more than ``dead_fraction`` of the units were never active over a sampled batch.

    Why: a ReLU unit whose input is negative for every example gets no gradient
    and never recovers ("dying ReLU"), typically after a too-large update or a
    bad bias initialisation; the network silently loses capacity.
    Source: SageMaker Debugger's dead-ReLU defaults (a unit is dead when active
    < 1% of the time; the layer is flagged above 50% dead units), Stanford
    CS231n notes "Neural Networks Part 1: Setting up the Architecture" (dying
    ReLUs); C. Shao, "Checklist for debugging neural networks" (Towards Data
    Science, 2019). The client's sampled forward hook counts, per unit
    (feature or channel), the share of the batch where the output is > 0.
    Thresholds: > 0.5 of a layer's units dead in each of the latest ``samples``
    (2) samples (one sample at the very start of a run); > 0.9 is critical.
    """

    name: ClassVar[str] = "DeadActivations"
    severity: ClassVar[Severity] = Severity.WARNING
    hints: ClassVar[Hints] = Hints(reads=("activations",))
    Config = DeadActivationsConfig
    advice: ClassVar[str] = (
        "Lower the learning rate, use He initialisation with zero (or small positive) biases, try LeakyReLU/GELU, "
        "and add normalisation before the activation."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        worst = worst_activation_layer(window, kinds=("relu",), attr="dead_fraction", threshold=cfg.dead_fraction,
                                       lookback_steps=cfg.lookback_steps, samples=cfg.samples)
        if worst is None:
            return None
        layer, fraction, sampled = worst
        s = window.steps[-1]
        return Finding(
            summary=(f"{fmt(100 * fraction)}% of the units of {layer} were never active over the sampled batch "
                     f"(up to step {sampled[-1].step}, rank {window.rank}): dying ReLU"),
            evidence={"step": s.step, "layer_name": layer, "dead_fraction": fraction, "samples": len(sampled)},
            step=s.step,
            rank=window.rank,
            layer=layer,
            severity=Severity.CRITICAL if fraction > cfg.critical_fraction else None,
        )
