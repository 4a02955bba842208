"""VanishingGradients: gradients too small to move the weights, or dying towards the input."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, ForSteps, Rule, WindowedConfig, fmt, median, sound_steps
from healthd.state.windows import RankWindow
from healthd.wire.records import StepRecord
from healthd.wire.schema import Severity

# Modules whose gradients are sparse by design (only looked-up rows get one):
# their per-element RMS says nothing about vanishing.
_SPARSE_GRAD_TYPES = ("Embedding", "EmbeddingBag")


class VanishingGradientsConfig(WindowedConfig):
    window_steps: int = Field(default=50, ge=5, description="steps whose median is judged")
    min_history_steps: int = Field(default=20, ge=3, description="steps needed before judging")
    min_grad_rms: float = Field(
        default=1e-7, gt=0, description="per-element RMS of the whole gradient below which it has vanished"
    )
    min_first_last_ratio: float = Field(
        default=1e-3, gt=0, description="RMS(first layer grad) / RMS(last layer grad) below which it vanishes"
    )
    for_steps: ForSteps = 10


class VanishingGradients(Rule[RankWindow, VanishingGradientsConfig]):
    """Gradients have vanished overall, or shrink by orders of magnitude towards the input.

    Why: layers whose gradients vanish stop learning; the loss plateaus while the
    GPU keeps burning. Deep sigmoid/tanh stacks and bad initialisation are the
    classic causes.

    Source: SageMaker Debugger's VanishingGradient (mean |g| < 1e-7; we use the
    per-element RMS, ||g|| / sqrt(n), which bounds mean |g| from above) and
    AUTOTRAINER's test (first/last layer gradient ratio < 1e-3), both on the
    median of the last ``window_steps`` so one quiet step does not count.
    Embedding layers are left out of the ratio (their gradients are sparse).
    """

    name: ClassVar[str] = "VanishingGradients"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = VanishingGradientsConfig
    advice: ClassVar[str] = (
        "Use ReLU-family activations instead of sigmoid/tanh in deep stacks, He/Xavier initialisation, "
        "normalisation layers (BatchNorm/LayerNorm) and residual connections; check the learning rate is not "
        "tiny and that no .detach() cuts the graph."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        norms = window.values("grad_norm", sound_steps(window, cfg.window_steps))  # since any NaN
        if len(norms) < cfg.min_history_steps:
            return None
        s = window.steps[-1]
        attach = window.meta.attach
        n_params = attach.model.trainable_count if attach and attach.model else 0
        med = median(norms)
        rms = med / math.sqrt(n_params) if n_params > 0 else med
        if rms < cfg.min_grad_rms:
            return Finding(
                summary=(f"Gradients have vanished: median per-element RMS {fmt(rms)} over the last "
                         f"{len(norms)} steps (threshold {fmt(cfg.min_grad_rms)}, rank {window.rank})"),
                evidence={"step": s.step, "median_grad_norm": med, "grad_rms": rms, "params": n_params},
                step=s.step,
                rank=window.rank,
            )
        steps = window.last(cfg.window_steps)
        ratio = self._first_last_ratio(window, steps)
        if ratio is not None and ratio[0] < cfg.min_first_last_ratio:
            value, first, last = ratio
            return Finding(
                summary=(f"Gradients vanish towards the input: RMS of {first} is {fmt(value)}x that of {last} "
                         f"(median over {len(steps)} steps, threshold {fmt(cfg.min_first_last_ratio)})"),
                evidence={"step": s.step, "first_last_ratio": value, "first_layer": first, "last_layer": last},
                step=s.step,
                rank=window.rank,
                layer=first,
            )
        return None

    @staticmethod
    def _first_last_ratio(window: RankWindow, steps: list[StepRecord]) -> tuple[float, str, str] | None:
        attach = window.meta.attach
        if attach is None or attach.model is None:
            return None
        layers = [li for li in attach.model.layers
                  if li.params > 0 and li.name != "other" and not li.module_type.endswith(_SPARSE_GRAD_TYPES)]
        if len(layers) < 2:
            return None
        first, last = layers[0], layers[-1]
        ratios = []
        for s in steps:
            a, b = s.layers.get(first.name), s.layers.get(last.name)
            if a is None or b is None or a.grad_norm is None or b.grad_norm is None:
                continue
            ra = a.grad_norm / math.sqrt(first.params)
            rb = b.grad_norm / math.sqrt(last.params)
            if math.isfinite(ra) and math.isfinite(rb) and rb > 0:
                ratios.append(ra / rb)
        if len(ratios) < max(3, len(steps) // 2):
            return None
        return median(ratios), first.name, last.name
