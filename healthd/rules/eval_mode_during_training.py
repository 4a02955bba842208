"""EvalModeDuringTraining: the optimizer steps while the model is in eval mode."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Hints, Rule, WindowedConfig, WindowSteps
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class EvalModeDuringTrainingConfig(WindowedConfig):
    window_steps: WindowSteps = Field(default=2, description="consecutive steps in eval mode before it counts")


class EvalModeDuringTraining(Rule[RankWindow, EvalModeDuringTrainingConfig]):
    """``model.training`` was False when the optimizer stepped, ``window_steps`` steps in a row.

    Why: after a validation pass that called ``model.eval()`` and no
    ``model.train()``, dropout is off and batch norm uses (and stops updating) its
    running statistics: the model trains as a different network, usually worse,
    with no error.
    Source: "forgot to toggle train/eval mode for the net", A. Karpathy's list of
    common neural net mistakes as quoted in J. Tobin, "Troubleshooting Deep
    Neural Networks" (Full Stack Deep Learning, 2019). Threshold:
    ``window_steps`` (2) consecutive steps, so an optimizer step taken inside an
    evaluation on purpose (rare) needs to repeat before it warns.
    """

    name: ClassVar[str] = "EvalModeDuringTraining"
    severity: ClassVar[Severity] = Severity.WARNING
    hints: ClassVar[Hints] = Hints(reads=("training",))
    Config = EvalModeDuringTrainingConfig
    advice: ClassVar[str] = (
        "Call model.train() before the training loop resumes after evaluation (model.eval() is sticky). "
        "Dropout and batch norm behave differently in the two modes."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        steps = window.latest_where(lambda s: s.training is not None, cfg.window_steps, 2 * cfg.window_steps)
        if len(steps) < cfg.window_steps or any(s.training for s in steps):
            return None
        s = steps[-1]
        first_eval = s.step
        for prev in reversed(window.steps):
            if prev.training is False:
                first_eval = prev.step
            elif prev.training:
                break
        return Finding(
            summary=(f"The optimizer stepped with the model in eval mode since step {first_eval} "
                     f"(now step {s.step}, rank {window.rank}): dropout/batch norm are in inference behaviour"),
            evidence={"step": s.step, "eval_mode_since_step": first_eval, "steps": s.step - first_eval + 1},
            step=s.step,
            rank=window.rank,
        )
