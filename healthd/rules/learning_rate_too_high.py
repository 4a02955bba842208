"""LearningRateTooHigh: updates too large relative to the weights, or loss blowing up after an LR increase."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    Finding,
    ForSteps,
    LookbackSteps,
    Rule,
    WindowedConfig,
    fmt,
    median,
    sound_steps,
)
from healthd.state.windows import RankWindow, finite
from healthd.wire.schema import Severity


class LearningRateTooHighConfig(WindowedConfig):
    window_steps: int = Field(default=10, ge=3, description="steps whose median update ratio is judged")
    warn_update_ratio: float = Field(default=0.1, gt=0, description="median ||dw||/||w|| that warns")
    info_update_ratio: float = Field(default=0.02, gt=0, description="median ||dw||/||w|| worth an info")
    lr_jump_factor: float = Field(default=2.0, gt=1, description="LR increase within the window that counts")
    loss_jump_factor: float = Field(default=2.0, gt=1, description="loss increase after the LR jump that counts")
    for_steps: ForSteps = 3
    lookback_steps: LookbackSteps = Field(default=100, description="steps searched for sampled update ratios "
                                "(the client measures them every heavy_every_steps)")
    min_samples: int = Field(default=3, ge=1, description="sampled update ratios needed before judging")


class LearningRateTooHigh(Rule[RankWindow, LearningRateTooHighConfig]):
    """Each update moves the weights by a large fraction of their size, or the loss blew up right after an LR increase.

    Why: too high a learning rate makes training oscillate or diverge, or
    settle in a poor region; it is the most common hyperparameter mistake.

    Source: the rule of thumb that ||dw||/||w|| should be around 1e-3, Stanford
    CS231n notes "Neural Networks Part 3: Learning and Evaluation" (ratio of
    weights:updates), also in C. Shao, "Checklist for debugging neural networks"
    (Towards Data Science, 2019).
    Adam's early updates are about lr per element, so healthy small models sit
    near 1e-2; the thresholds are set above that: ``warn_update_ratio`` 0.1
    (100x CS231n) warns, ``info_update_ratio`` 0.02 informs. The median over
    ``window_steps`` is used so one large step (e.g. right after warm-up) does
    not count.
    """

    name: ClassVar[str] = "LearningRateTooHigh"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = LearningRateTooHighConfig
    advice: ClassVar[str] = (
        "Lower the learning rate (try 3-10x lower), add warm-up, or clip gradients. The update-to-weight "
        "ratio should be around 1e-3 (CS231n); Adam at ~1e-3 to 3e-4 is a good default."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        steps = window.last(cfg.window_steps)
        s = steps[-1] if steps else None
        if s is None:
            return None
        lr = s.lr[0] if s.lr else None
        jump = self._loss_after_lr_jump(window)
        if jump is not None:
            lr_before, lr_after, loss_before, loss_after = jump
            return Finding(
                summary=(f"Loss rose {fmt(loss_after / loss_before)}x right after the learning rate went from "
                         f"{fmt(lr_before)} to {fmt(lr_after)} (step {s.step}, rank {window.rank})"),
                evidence={"step": s.step, "lr_before": lr_before, "lr_after": lr_after,
                          "loss_before": loss_before, "loss_after": loss_after},
                step=s.step,
                rank=window.rank,
            )
        # update ratios are sampled (every heavy_every_steps), so take the last window_steps samples
        ratios = window.values("update_ratio", cfg.lookback_steps)[-cfg.window_steps:]
        if len(ratios) < cfg.min_samples:
            return None
        med = median(ratios)
        if med < cfg.info_update_ratio:
            return None
        worst = max(((n, ls.update_ratio) for n, ls in s.layers.items()
                     if ls.update_ratio is not None and math.isfinite(ls.update_ratio)),
                    key=lambda kv: kv[1], default=(None, None))
        severity = None if med >= cfg.warn_update_ratio else Severity.INFO
        return Finding(
            summary=(f"Update-to-weight ratio {fmt(med)} (median of {len(ratios)} steps) is "
                     f"{med / 1e-3:.0f}x the ~1e-3 rule of thumb at lr={fmt(lr)} (rank {window.rank})"),
            evidence={"step": s.step, "median_update_ratio": med, "lr": lr,
                      "largest_layer": worst[0], "largest_layer_update_ratio": worst[1]},
            step=s.step,
            rank=window.rank,
            layer=worst[0],
            severity=severity,
        )

    def _loss_after_lr_jump(self, window: RankWindow) -> tuple[float, float, float, float] | None:
        cfg = self.config
        # The kept whole steps since any NaN/Inf, as columns.
        n = min(sound_steps(window, 2 * cfg.window_steps), len(window.steps))
        lrs, losses = window.column("lr", n), window.column("loss", n)
        if len(lrs) < 4:
            return None
        for i in range(1, len(lrs)):
            a, b = lrs[i - 1], lrs[i]
            if a is None or b is None or a <= 0 or b / a < cfg.lr_jump_factor:
                continue
            before = finite(losses[max(0, i - 5):i])
            after = finite(losses[i:])
            if len(before) < 2 or len(after) < 3:
                return None
            lb, la = median(before), median(after[-3:])
            if lb > 0 and la / lb >= cfg.loss_jump_factor:
                return a, b, lb, la
        return None
