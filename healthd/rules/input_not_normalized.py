"""InputNotNormalized: the model's inputs are far from zero mean / unit scale."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Hints, LookbackSteps, Rule, SampledConfig, fmt, median
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class InputNotNormalizedConfig(SampledConfig):
    lookback_steps: LookbackSteps = Field(default=100, description="steps searched for sampled input statistics")
    samples: int = Field(default=3, ge=1, description="latest samples whose median is judged")
    warn_abs_mean: float = Field(default=2.0, gt=0, description="|mean| (in input units) that warns")
    warn_std: float = Field(default=4.0, gt=1, description="std above which it warns (or below 1/this)")
    info_abs_mean: float = Field(default=1.0, gt=0, description="|mean| worth an info")
    info_std: float = Field(default=2.0, gt=1, description="std above which (or below 1/this) it informs")


class InputNotNormalized(Rule[RankWindow, InputNotNormalizedConfig]):
    """The first floating-point input of the model has a mean far from 0 or a scale far from 1.

    Why: unnormalised inputs (raw pixels 0..255, features in different units)
    make the loss surface badly conditioned: the first layer's gradients are
    scaled by the input, the learning rate that suits one feature blows up
    another, and training is slow or unstable.
    Source: Stanford CS231n notes "Neural Networks Part 2: Setting up the Data
    and the Loss" (mean subtraction, normalization); J. Tobin, "Troubleshooting
    Deep Neural Networks" (Full Stack Deep Learning, 2019): "normalize scale of
    input data". Statistics come from a sampled forward pre-hook on the root module
    over all elements of the batch; integer inputs (token ids) are not judged.
    Thresholds (median of the latest ``samples``): |mean| > ``warn_abs_mean`` (2)
    or std > ``warn_std`` (4) or < 1/4 warns; > 1 / > 2 / < 1/2 informs (inputs
    scaled to [0, 1], mean ~0.3, std ~0.35, stay below the warning).
    """

    name: ClassVar[str] = "InputNotNormalized"
    severity: ClassVar[Severity] = Severity.WARNING
    hints: ClassVar[Hints] = Hints(reads=("inputs",))
    Config = InputNotNormalizedConfig
    advice: ClassVar[str] = (
        "Standardise inputs (subtract the training set's mean, divide by its std, per feature/channel; "
        "torchvision.transforms.Normalize for images), computed on the training split only."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        sampled = window.latest_where(lambda s: s.inputs is not None, cfg.samples, cfg.lookback_steps)
        if not sampled:
            return None
        mean = median([s.inputs.mean for s in sampled if s.inputs])
        std = median([s.inputs.std for s in sampled if s.inputs])
        abs_max = max(s.inputs.abs_max for s in sampled if s.inputs)
        if abs(mean) > cfg.warn_abs_mean or std > cfg.warn_std or std < 1 / cfg.warn_std:
            severity = None
        elif abs(mean) > cfg.info_abs_mean or std > cfg.info_std or std < 1 / cfg.info_std:
            severity = Severity.INFO
        else:
            return None
        s = window.steps[-1]
        return Finding(
            summary=(f"Inputs are not normalised: mean {fmt(mean)}, std {fmt(std)}, max |x| {fmt(abs_max)} "
                     f"(median of {len(sampled)} sampled batches up to step {sampled[-1].step}, rank {window.rank})"),
            evidence={"step": s.step, "input_mean": mean, "input_std": std, "input_abs_max": abs_max,
                      "samples": len(sampled)},
            step=s.step,
            rank=window.rank,
            severity=severity,
        )
