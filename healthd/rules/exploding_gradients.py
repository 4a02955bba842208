"""ExplodingGradients: the gradient norm jumps far above its recent level."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ResolveAfterSteps,
    Rule,
    WindowedConfig,
    fmt,
    layer_values,
    median,
    sound_steps,
)
from healthd.state.windows import RankWindow, finite
from healthd.wire.records import StepRecord
from healthd.wire.schema import Severity


class ExplodingGradientsConfig(WindowedConfig):
    window_steps: int = Field(default=50, ge=5, description="trailing steps that set the baseline")
    min_history_steps: int = Field(default=10, ge=3, description="steps needed before judging")
    spike_factor: float = Field(default=10.0, gt=1, description="grad norm / trailing median that counts as a spike")
    critical_factor: float = Field(default=100.0, gt=1, description="factor at which the alert is critical")
    sustain_factor: float = Field(default=5.0, gt=1, description="grad norm / trailing median of a neighbouring "
                                  "step that makes a spike sustained")
    confirm_steps: int = Field(default=3, ge=0, description="steps after a spike searched for the loss damage "
                               "that confirms it")
    resolve_after_steps: ResolveAfterSteps = 20


class ExplodingGradients(Rule[RankWindow, ExplodingGradientsConfig]):
    """The global gradient norm is many times its trailing median.

    Why: exploding gradients throw the weights far from where they were; the loss
    jumps or turns NaN a few steps later. Relative to the run's own recent level,
    so it needs no per-model absolute threshold.

    One large gradient is not an explosion: near convergence the gradient norm
    is heavy-tailed (one hard minibatch gives 10x the median) and the update is
    harmless. So a spike of ``spike_factor`` (10x) the median of the
    ``window_steps`` before it needs evidence that it matters, one of:
    magnitude (``critical_factor``, 100x, on its own: fires at that step,
    critical); sustained or growing (the step before or after it is also over
    ``sustain_factor``, 5x); or loss damage (within ``confirm_steps``, 3, after
    it a loss is non-finite, or two losses in a row are above every loss of
    the window before it and above twice their median). Steps before the last NaN/Inf are not read.

    Source: "vanishing or exploding gradients" and gradient clipping in C. Shao,
    "Checklist for debugging neural networks" (Towards Data Science, 2019);
    Goodfellow, Bengio & Courville, "Deep Learning" (MIT Press, 2016), 10.11.1
    "Clipping Gradients"; Pascanu, Mikolov & Bengio, "On the difficulty of
    training recurrent neural networks" (ICML 2013: explosions as sustained
    growth of the gradient norm).
    """

    name: ClassVar[str] = "ExplodingGradients"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = ExplodingGradientsConfig
    advice: ClassVar[str] = (
        "Clip gradients by norm (torch.nn.utils.clip_grad_norm_), lower the learning rate or add warm-up, "
        "and check for a bad batch (outliers, unnormalised inputs). Normalisation layers and careful "
        "initialisation (Xavier/He) keep gradient scales stable."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        # Candidates: the steps that just arrived and the ``confirm_steps`` before them (a spike there
        # may have gathered its evidence since). The baseline: the steps before the candidates, all
        # since the last NaN/Inf (NonFiniteValues' finding; a window straddling it means nothing).
        sound = sound_steps(window, cfg.window_steps + cfg.confirm_steps + len(window.new))
        m = min(len(window.new) + cfg.confirm_steps, sound)
        if m <= 0:
            return None
        norms = window.column("grad_norm", sound)
        history = finite(norms[:-m])[-cfg.window_steps:]
        if len(history) < cfg.min_history_steps:
            return None
        base = median(history)
        region = window.last(m)
        spike = cfg.spike_factor * base
        if base <= 0 or not any(g is not None and g >= spike for g in norms[-m:]):
            return None  # the common case: no step far above the baseline
        losses = finite(window.column("loss", sound)[:-m])
        loss_ceiling = max(max(losses), 2 * median(losses)) if losses else None
        best: tuple[float, int, str, int] | None = None
        for i, s in enumerate(region):
            g = s.grad_norm
            if g is None or not math.isfinite(g) or g < spike:
                continue
            got = self._evidence(cfg, region, i, base, loss_ceiling)
            if got is not None and (best is None or g / base > best[0]):
                best = (g / base, i, *got)
        if best is None:
            return None
        factor, i, why, seen_at = best
        s = region[i]
        assert s.grad_norm is not None
        worst = max(layer_values(s, "grad_norm").items(), key=lambda kv: kv[1], default=(None, None))
        return Finding(
            summary=(
                f"Gradient norm {fmt(s.grad_norm)} at step {s.step} is {factor:.0f}x its median "
                f"{fmt(base)} over the {len(history)} steps before ({why}; rank {window.rank})"
            ),
            evidence={"step": seen_at, "spike_step": s.step, "grad_norm": s.grad_norm, "median_grad_norm": base,
                      "factor": factor, "evidence": why, "largest_layer": worst[0],
                      "largest_layer_grad_norm": worst[1]},
            step=seen_at,
            rank=window.rank,
            layer=worst[0],
            severity=Severity.CRITICAL if factor >= cfg.critical_factor else None,
        )

    @staticmethod
    def _evidence(cfg: ExplodingGradientsConfig, region: list[StepRecord], i: int, base: float,
                  loss_ceiling: float | None) -> tuple[str, int] | None:
        """Why the spike at ``region[i]`` is an explosion rather than one large minibatch gradient, and
        the step at which that evidence was complete; None without evidence."""
        s = region[i]
        g = s.grad_norm
        assert g is not None
        if g >= cfg.critical_factor * base:
            return f"over {cfg.critical_factor:g}x on its own", s.step
        for j in (i - 1, i + 1):
            v = region[j].grad_norm if 0 <= j < len(region) else None
            if v is not None and math.isfinite(v) and v >= cfg.sustain_factor * base:
                return f"sustained: step {region[j].step} is over {cfg.sustain_factor:g}x too", max(s.step,
                                                                                                  region[j].step)
        # Damage lasts: two losses in a row above every loss before (one can be a hard minibatch), or a NaN.
        above = 0
        for later in region[i + 1:i + 1 + cfg.confirm_steps]:
            v = later.loss
            if v is not None and not math.isfinite(v):
                return f"followed by loss damage: the loss at step {later.step} is non-finite", later.step
            above = above + 1 if v is not None and loss_ceiling is not None and v > loss_ceiling else 0
            if above == 2:
                return f"followed by loss damage: the losses up to step {later.step} are above any before", \
                    later.step
        return None
