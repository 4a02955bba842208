"""LearningRateTooHigh: updates too large relative to the weights, or loss blowing up after an LR increase."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import (
    EvidenceValue,
    Finding,
    ForSteps,
    LookbackSteps,
    Rule,
    WindowedConfig,
    fmt,
    gradless_layers,
    loss_damage,
    median,
    oversized_updates,
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
    loss_block_steps: int = Field(default=10, ge=1, description="steps whose median loss is one point of the "
                                  "loss's course (minibatch noise)")
    stall_fraction: float = Field(default=0.8, gt=0, le=1, description="damage: the recent median loss is at "
                                  "least this fraction of the initial one")
    gave_back_fraction: float = Field(default=0.25, gt=0, le=1, description="damage: the loss gave back this "
                                      "share of its progress from the initial loss to its best")
    blowup_factor: float = Field(default=3.0, gt=1, description="damage: a median of ``loss_block_steps`` "
                                 "losses reached this multiple of the loss before any update (step 0), and the "
                                 "loss is still above that start")
    damage_min_steps: int = Field(default=50, ge=1, description="sound steps needed before the loss's damage is judged")
    clip_rtol: float = Field(default=1e-3, gt=0, description="gradient norms within this relative distance of "
                             "the window's largest count as pinned by clipping (evidence)")


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

    Adaptive optimizers (Adam, AdamW, Adadelta, RMSprop) normalize the update and
    gradient clipping caps the gradient, so an LR 100x too high may show only an
    info-level ratio. It warns when that ratio comes with damage: the loss
    stalled (median of ``loss_block_steps`` still at least ``stall_fraction`` of
    the initial loss), gave back ``gave_back_fraction`` of its progress, blew
    up (a median of ``loss_block_steps`` losses at ``blowup_factor`` (3x) or
    more the loss at step 0, before any update, and still above that start:
    RMSprop 100x too high throws a classifier's loss from ln(C) to 10-140x it
    within its first updates, with update ratios only 40-60x the rule of
    thumb, and then it crawls back), or layers get no gradient any more. A
    stream whose loss training does not drive down (``loss_kind="adversarial"``,
    a GAN player's) is not judged on a blow-up. After oversized updates (a median of
    ``min_samples`` samples at ``warn_update_ratio``) it keeps firing while their
    damage persists, even once the updates look small: a network killed by a
    high LR moves no weights, which is not a learning rate too low. Clipping is
    inferred from the series (the measured, post-clip gradient norm pinned at
    one value, within ``clip_rtol``) and shown as evidence.
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
        damage = self._damage(window)
        evidence: dict[str, EvidenceValue] = {"step": s.step, "median_update_ratio": med, "lr": lr}
        clip = self._clipping(window)
        if clip is not None:
            evidence.update(clipped_grad_norm=clip[0], clipped_steps=clip[1], clip_window_steps=clip[2])
        clip_text = f"; gradient norm pinned at {fmt(clip[0])} on {clip[1]}/{clip[2]} steps (clipping)" if clip else ""
        if med < cfg.info_update_ratio:
            seen = oversized_updates(window, cfg.warn_update_ratio, cfg.min_samples)
            if seen is None or damage is None:
                return None
            evidence.update(damage[1], oversized_step=seen[0], oversized_update_ratio=seen[1])
            return Finding(
                summary=(f"Oversized updates (median update-to-weight ratio {fmt(seen[1])} by step {seen[0]}) "
                         f"left damage that persists: {damage[0]} (now {fmt(med)} at lr={fmt(lr)}, rank "
                         f"{window.rank}){clip_text}"),
                evidence=evidence, step=s.step, rank=window.rank,
            )
        worst = max(((n, ls.update_ratio) for n, ls in s.layers.items()
                     if ls.update_ratio is not None and math.isfinite(ls.update_ratio)),
                    key=lambda kv: kv[1], default=(None, None))
        severity = None if med >= cfg.warn_update_ratio or damage is not None else Severity.INFO
        evidence.update(largest_layer=worst[0], largest_layer_update_ratio=worst[1])
        if damage is not None:
            evidence.update(damage[1])
        return Finding(
            summary=(f"Update-to-weight ratio {fmt(med)} (median of {len(ratios)} steps) is "
                     f"{med / 1e-3:.0f}x the ~1e-3 rule of thumb at lr={fmt(lr)} (rank {window.rank})"
                     + (f"; {damage[0]}" if damage else "") + clip_text),
            evidence=evidence,
            step=s.step,
            rank=window.rank,
            layer=worst[0],
            severity=severity,
        )

    def _damage(self, window: RankWindow) -> tuple[str, dict[str, EvidenceValue]] | None:
        """What oversized updates wreck, as it stands now: (words, evidence); None when nothing is."""
        cfg = self.config
        s = window.steps[-1]
        # the same layers gradless on the last 3 steps (a lone zero, e.g. a bias before BatchNorm, is not death)
        last = [st for st in window.last(3) if st.layers]
        dead = sorted(set.intersection(*(set(gradless_layers(st)) for st in last))) if len(last) == 3 else []
        if dead:
            return (f"{len(dead)} of {len(s.layers)} layers get no gradient, e.g. {dead[0]}",
                    {"layers_without_gradient": len(dead), "example_layer": dead[0]})
        blown = self._blown_up(window)
        if blown is not None:
            return blown
        ld = loss_damage(window, cfg.loss_block_steps, cfg.stall_fraction, cfg.damage_min_steps)
        if ld is None:
            return None
        evidence: dict[str, EvidenceValue] = {"initial_loss": ld.initial, "best_loss": ld.best,
                                              "recent_loss": ld.recent}
        if ld.stalled:
            return f"the loss stalled at {fmt(ld.recent)} (it started at {fmt(ld.initial)})", evidence
        if ld.gave_back >= cfg.gave_back_fraction:
            return (f"the loss rose back to {fmt(ld.recent)} from its best {fmt(ld.best)} "
                    f"({100 * ld.gave_back:.0f}% of its progress lost)", evidence)
        return None

    def _blown_up(self, window: RankWindow) -> tuple[str, dict[str, EvidenceValue]] | None:
        """The loss blew up after the first updates and has not come back down to where it started: the
        peak median of ``loss_block_steps`` losses (minibatch noise) against the loss at step 0, which the
        client computes before the first update (the model at its initialisation; not the first losses
        reported, which a learning rate this high has already blown up). None without a step 0."""
        cfg = self.config
        first = window.initial_steps[:1]
        if not window.meta.loss_minimized or not first or first[0].step != 0:
            return None  # an adversarial loss rises whenever the other player improves
        start = first[0].loss
        if start is None or not math.isfinite(start) or start <= 0:
            return None
        losses = window.values("loss", sound_steps(window, len(window.steps)))
        b = cfg.loss_block_steps
        blocks = [median(losses[i:i + b]) for i in range(len(losses) % b, len(losses), b)]
        if not blocks:
            return None
        peak, recent = max(blocks), blocks[-1]
        if peak < cfg.blowup_factor * start or recent < start:
            return None
        return (f"the loss blew up to {fmt(peak)} ({fmt(peak / start)}x its {fmt(start)} before any update) and "
                f"is still above that start ({fmt(recent)})",
                {"step0_loss": start, "peak_loss": peak, "recent_loss": recent})

    def _clipping(self, window: RankWindow) -> tuple[float, int, int] | None:
        """Whether gradient clipping capped most recent steps: healthd measures the gradient the optimizer
        applies (after ``clip_grad_norm_``), so clipping shows as one norm repeated step after step.
        (the norm, the steps pinned at it, the steps looked at); None when fewer than half are."""
        cfg = self.config
        norms = window.values("grad_norm", sound_steps(window, cfg.window_steps))
        if len(norms) < cfg.window_steps // 2 or not norms:
            return None
        top = max(norms)
        pinned = sum(1 for g in norms if top - g <= cfg.clip_rtol * top)
        return (top, pinned, len(norms)) if top > 0 and 2 * pinned >= len(norms) else None

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
