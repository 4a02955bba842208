"""MissingZeroGrad: gradients were already non-zero when backward began (optimizer.zero_grad() forgotten)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Hints, Rule, WindowedConfig, WindowSteps
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class MissingZeroGradConfig(WindowedConfig):
    window_steps: WindowSteps = Field(default=3, description="consecutive measured steps with stale gradients")


class MissingZeroGrad(Rule[RankWindow, MissingZeroGradConfig]):
    """Gradients left over from the previous optimizer step were still there when the next backward began.

    Why: without ``optimizer.zero_grad()`` every backward adds to the old
    gradients, so the update is a running sum of all past gradients: the
    effective learning rate grows step after step and training oscillates or
    diverges while the code looks right.
    Source: "forgot to .zero_grad() (in pytorch) before .backward()", A.
    Karpathy's list of common neural net mistakes as quoted in J. Tobin,
    "Troubleshooting Deep Neural Networks" (Full Stack Deep Learning, 2019).
    The client judges the gradients THIS optimizer's step reads: they are stale
    when no backward since its previous step saw a reset (a gradient hook fires
    before accumulation and sees ``None`` or zeros after ``zero_grad``). Gradients
    another loss leaves on these parameters are not stale: in an alternating GAN
    the generator's loss flows through the discriminator after the
    discriminator's step, and its ``zero_grad`` before its own backward clears
    them. Intended accumulation zeroes after each optimizer step, so its
    micro-batches are never flagged (``grad_accumulation_steps`` is named in the
    alert).
    Threshold: ``window_steps`` (3) consecutive measured steps with stale gradients.
    """

    name: ClassVar[str] = "MissingZeroGrad"
    severity: ClassVar[Severity] = Severity.CRITICAL
    hints: ClassVar[Hints] = Hints(reads=("grads_stale_at_backward",))
    Config = MissingZeroGradConfig
    advice: ClassVar[str] = (
        "Call optimizer.zero_grad(set_to_none=True) once per optimizer step (before backward, or right after "
        "optimizer.step()). For gradient accumulation, zero after the optimizer step, never between micro-batches."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        recent = window.latest_where(lambda s: s.grads_stale_at_backward is not None, cfg.window_steps,
                                     4 * cfg.window_steps)
        if len(recent) < cfg.window_steps or not all(s.grads_stale_at_backward for s in recent):
            return None
        s = recent[-1]
        acc = window.meta.grad_accumulation_steps
        return Finding(
            summary=(f"Gradients were already non-zero when backward began on {len(recent)} steps in a row "
                     f"(up to step {s.step}, rank {window.rank}): zero_grad() is missing, so gradients "
                     f"accumulate across optimizer steps (grad_accumulation_steps={acc})"),
            evidence={"step": s.step, "steps": len(recent), "grad_accumulation_steps": acc},
            step=s.step,
            rank=window.rank,
        )
