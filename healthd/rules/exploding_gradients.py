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
)
from healthd.state.windows import RankWindow, finite
from healthd.wire.schema import Severity


class ExplodingGradientsConfig(WindowedConfig):
    window_steps: int = Field(default=50, ge=5, description="trailing steps that set the baseline")
    min_history_steps: int = Field(default=10, ge=3, description="steps needed before judging")
    spike_factor: float = Field(default=10.0, gt=1, description="grad norm / trailing median that counts as a spike")
    critical_factor: float = Field(default=100.0, gt=1, description="factor at which the alert is critical")
    resolve_after_steps: ResolveAfterSteps = 20


class ExplodingGradients(Rule[RankWindow, ExplodingGradientsConfig]):
    """The global gradient norm is many times its trailing median.

    Why: exploding gradients throw the weights far from where they were; the loss
    jumps or turns NaN a few steps later. Relative to the run's own recent level,
    so it needs no per-model absolute threshold.

    Source: "vanishing or exploding gradients" and gradient clipping in C. Shao,
    "Checklist for debugging neural networks" (Towards Data Science, 2019);
    Goodfellow, Bengio & Courville, "Deep Learning" (MIT Press, 2016), 10.11.1
    "Clipping Gradients". Thresholds: ``spike_factor`` 10x the median of the last
    ``window_steps`` (warning), ``critical_factor`` 100x (critical).
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
        # The largest gradient norm among the steps that just arrived, judged against the steps before it.
        new = window.new
        candidates = [(s.grad_norm, i) for i, s in enumerate(new) if s.grad_norm is not None
                      and math.isfinite(s.grad_norm)]
        if not candidates:
            return None
        _, i = max(candidates)
        s = new[i]
        assert s.grad_norm is not None
        before = len(new) - i  # steps from s to the newest, s included
        history = finite(window.column("grad_norm", cfg.window_steps + before)[:-before])
        if len(history) < cfg.min_history_steps:
            return None
        base = median(history)
        if base <= 0:
            return None
        factor = s.grad_norm / base
        if factor < cfg.spike_factor:
            return None
        worst = max(layer_values(s, "grad_norm").items(), key=lambda kv: kv[1], default=(None, None))
        return Finding(
            summary=(
                f"Gradient norm {fmt(s.grad_norm)} at step {s.step} is {factor:.0f}x its median "
                f"{fmt(base)} over the last {len(history)} steps (rank {window.rank})"
            ),
            evidence={"step": s.step, "grad_norm": s.grad_norm, "median_grad_norm": base, "factor": factor,
                      "largest_layer": worst[0], "largest_layer_grad_norm": worst[1]},
            step=s.step,
            rank=window.rank,
            layer=worst[0],
            severity=Severity.CRITICAL if factor >= cfg.critical_factor else None,
        )
