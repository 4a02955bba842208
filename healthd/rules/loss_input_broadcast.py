"""LossInputBroadcast: a loss's input and target shapes differ and broadcast silently."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Hints, LookbackSteps, Rule, SampledConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class LossInputBroadcastConfig(SampledConfig):
    lookback_steps: LookbackSteps = Field(default=50, description="how far back the last inspected loss call may be")


class LossInputBroadcast(Rule[RankWindow, LossInputBroadcastConfig]):
    """An elementwise loss (mse, l1, huber, ...) got an input and a target whose shapes broadcast, e.g. (N, 1) vs (N,).

    Why: (N, 1) - (N,) broadcasts to (N, N): the loss compares every prediction
    with every target, its minimum is the target's mean, and the model learns
    to predict a constant. PyTorch only warns once, easily lost in a log.
    Source: "incorrect shapes for your tensors ... accidental broadcasting", J.
    Tobin, "Troubleshooting Deep Neural Networks" (Full Stack Deep Learning,
    2019). The
    client compares the shapes of sampled loss calls. Threshold: any inspected
    call where the shapes differ and broadcast.
    """

    name: ClassVar[str] = "LossInputBroadcast"
    severity: ClassVar[Severity] = Severity.CRITICAL
    hints: ClassVar[Hints] = Hints(reads=("loss_inputs",))
    Config = LossInputBroadcastConfig
    advice: ClassVar[str] = (
        "Make input and target the same shape before the loss: pred.squeeze(-1) or target.unsqueeze(-1) "
        "(check which one is (N, 1)); assert pred.shape == target.shape in the training step."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        s = next((s for s in reversed(window.last(self.config.lookback_steps)) if s.loss_inputs), None)
        if s is None:
            return None
        bad = next((c for c in s.loss_inputs if c.broadcasts), None)
        if bad is None:
            return None
        return Finding(
            summary=(f"{bad.fn} at step {s.step} (rank {window.rank}) got input {bad.input_shape} and target "
                     f"{bad.target_shape}: they broadcast, so every prediction is compared with every target"),
            evidence={"step": s.step, "fn": bad.fn, "input_shape": str(bad.input_shape),
                      "target_shape": str(bad.target_shape)},
            step=s.step,
            rank=window.rank,
        )
