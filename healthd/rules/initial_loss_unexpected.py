"""InitialLossUnexpected: the first losses are far from the chance level ln(C)."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Rule, RuleConfig, fmt, loss_classes, median, series
from healthd.state.windows import RankWindow, finite
from healthd.wire.records import StepRecord
from healthd.wire.schema import Severity


class InitialLossUnexpectedConfig(RuleConfig):
    first_steps: int = Field(default=1, ge=1, description="first losses (from step 0, the forward pass before any "
                             "update) whose median is compared with chance; beyond 1, losses after updates count too")
    warn_factor: float = Field(default=2.0, gt=1, description="initial/chance ratio from which a fine-tune's start "
                               "above chance warns (a start below chance never warns)")
    warn_above_factor: float = Field(default=1.5, gt=1, description="initial/chance ratio (a start above chance) "
                                     "that warns, for a run from scratch")
    info_factor: float = Field(default=1.5, gt=1, description="initial/chance ratio (or its inverse) worth an info")
    report_until_step: int = Field(default=200, ge=1, description="stop reporting (resolve) after this step")
    fine_tune_min_classes: int = Field(
        default=100, ge=2, description="classes from which a fine-tune's first loss at chance warns (a fresh "
        "classification head on a pretrained body starts at chance; a pretrained language model never does)")


class InitialLossUnexpected(Rule[RankWindow, InitialLossUnexpectedConfig]):
    """The loss at step 0 (the first forward pass, before any update) is far from ln(C), a uniform guess's loss.

    Why: at initialisation a classifier should be unsure; a first loss far above
    ln(C) means a badly scaled output layer or initialisation (overconfident
    wrong guesses), far below means the labels leak into the input or the loss
    is not what you think.
    Source: A. Karpathy, "A Recipe for Training Neural Networks" (2019): "verify
    loss @ init", -log(1/n_classes); Stanford CS231n notes "Neural Networks Part
    3: Learning and Evaluation": "look for correct loss at chance performance".
    Only for cross-entropy-style losses: C comes from ``num_classes=`` or from the
    second dim of the inspected cross_entropy/nll_loss input. The value judged
    is the loss reported at step 0, computed before the first optimizer update
    (``first_steps``, 1, losses from step 0 on; their median); a loss that blows
    up after updates is the learning rate's finding, not the init's; a rank
    whose first report is not step 0 is not judged. Thresholds: ratio >=
    ``warn_above_factor`` (1.5x) warns; below chance by ``info_factor`` (1.5x)
    or more informs. Reported until ``report_until_step``, then it resolves.
    Why 1.5x above: a freshly initialised classifier's first loss sits within a
    few percent of ln(C) (the zoo's healthy controls from scratch: 0.98-1.08x
    over 3 seeds, CNNs, LSTM, a transformer LM, bf16), while an output layer
    initialised 30x too large starts at 1.85-2.55x; 1.5x is an overconfident
    wrong guess on every example, not an initialisation's noise.

    Below chance is at most an info, with or without the hint: before any update a
    loss far below ln(C) is what trained weights produce (a fine-tune whose weights
    came from a plain ``model.load_state_dict(torch.load(ckpt))``, which leaves no
    trace on the model; most training today is fine-tuning); the info says so and
    how to tell healthd (``attach(fine_tune=True)``), and names the rarer reading (a
    loss not over C balanced classes, labels leaking into the inputs). A step-0
    loss below 2/3 of chance also makes the other loss rules treat the run as a
    fine-tune (``healthd.rules.base.trained_start``).

    Fine-tunes (the attach hint ``fine_tune``: ``attach(fine_tune=True)``, a peft
    wrapper, a Hugging Face model loaded by name) start from trained weights, so
    a first loss below chance is what success looks like and is not judged.
    Their fault is the opposite one: a first loss AT chance (within
    ``info_factor``) over ``fine_tune_min_classes`` (100) or more classes means the
    pretrained weights did not load (a wrong checkpoint path, mismatched keys
    dropped by ``strict=False``) and warns. With fewer classes a fresh
    classification head on a pretrained body legitimately starts at chance.

    Not for a stream whose loss training does not drive down (the attach hint ``loss_kind="adversarial"``:
    a GAN's generator or discriminator loss rises whenever the other player improves): not judged.
    """

    name: ClassVar[str] = "InitialLossUnexpected"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = InitialLossUnexpectedConfig
    advice: ClassVar[str] = (
        "Check the output layer's initialisation (small weights, zero or prior-matching bias), that no "
        "activation follows the logits, that the loss is computed on the right tensors, and that labels do "
        "not leak into the inputs. Expect ln(C) for C balanced classes at step 0. A fine-tune at chance: check that "
        "the checkpoint loaded (the path, and the missing/unexpected keys load_state_dict returns)."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        if not window.meta.loss_minimized:
            return None  # an adversarial loss (a GAN player's) has no shape to judge
        cfg = self.config
        s = window.latest
        if s is None or window.new[0].step > cfg.report_until_step:
            return None  # judged while the first steps arrive (they may all arrive in one request)
        # The loss the client reports at step 0 comes from the first forward pass, before any update:
        # the model at its initialisation. Later losses come after updates (a learning rate that blows
        # the loss up at step 1 says nothing about the init), so only steps 0..first_steps-1 count, and
        # only when the rank's first report is step 0 (a monitor attached to a resumed run has no init).
        first = [r for r in window.initial_steps[:cfg.first_steps] if r.step < cfg.first_steps]
        if not first or first[0].step != 0:
            return None
        losses = finite(series(first, "loss"))
        if len(losses) < len(first):
            return None
        classes = loss_classes(window)
        if classes is None or classes < 2:
            return None
        chance = math.log(classes)
        initial = median(losses)
        ratio = initial / chance
        off = max(ratio, 1 / ratio) if ratio > 0 else math.inf
        if window.meta.fine_tune:
            return self._fine_tune(window, first, initial, chance, classes, ratio, off)
        warns = ratio >= cfg.warn_above_factor  # below chance is at most an info (see _below_chance)
        if off < cfg.info_factor and not warns:
            return None
        if ratio < 1:
            return self._below_chance(window, first, initial, chance, classes, ratio)
        return Finding(
            summary=(f"Initial loss {fmt(initial)} ({_which(first)}) is {fmt(ratio)}x "
                     f"the chance level ln({classes}) = {fmt(chance)} (rank {window.rank})"),
            evidence={"step": first[0].step, "initial_loss": initial, "chance_loss": chance, "classes": classes,
                      "ratio": ratio},
            step=s.step,
            rank=window.rank,
            severity=None if warns else Severity.INFO,
        )

    def _below_chance(self, window: RankWindow, first: list[StepRecord], initial: float, chance: float,
                      classes: int, ratio: float) -> Finding:
        """Below chance without the fine-tune hint: trained weights loaded where healthd cannot see it (a plain
        ``load_state_dict``), far more often than a loss that is not what it seems. An info that says both."""
        return Finding(
            summary=(f"Initial loss {fmt(initial)} ({_which(first)}) is {fmt(ratio)}x the chance level "
                     f"ln({classes}) = {fmt(chance)} (rank {window.rank}): the model starts from trained weights "
                     f"(a fine-tune: pass attach(fine_tune=True) to say so), or, less likely before any update, "
                     f"the loss is not over {classes} balanced classes or labels leak into the inputs"),
            evidence={"step": first[0].step, "initial_loss": initial, "chance_loss": chance, "classes": classes,
                      "ratio": ratio, "fine_tune": False},
            step=window.steps[-1].step,
            rank=window.rank,
            severity=Severity.INFO,
        )

    def _fine_tune(self, window: RankWindow, first: list[StepRecord], initial: float, chance: float,
                   classes: int, ratio: float, off: float) -> Finding | None:
        cfg = self.config
        s = window.steps[-1]
        if ratio > 1 and off >= cfg.info_factor:  # far above chance: as broken as in a run from scratch
            return Finding(
                summary=(f"Initial loss {fmt(initial)} ({_which(first)}) of this fine-tune is {fmt(ratio)}x "
                         f"the chance level ln({classes}) = {fmt(chance)} (rank {window.rank})"),
                evidence={"step": first[0].step, "initial_loss": initial, "chance_loss": chance, "classes": classes,
                          "ratio": ratio, "fine_tune": True},
                step=s.step, rank=window.rank,
                severity=None if off >= cfg.warn_factor else Severity.INFO,
            )
        if off >= cfg.info_factor or classes < cfg.fine_tune_min_classes:
            return None  # below chance: the pretrained weights are doing their job
        return Finding(
            summary=(f"Initial loss {fmt(initial)} ({_which(first)}) of this fine-tune is at the chance level "
                     f"ln({classes}) = {fmt(chance)} ({fmt(ratio)}x): a pretrained model starts well below "
                     f"chance, so the pretrained weights probably did not load (rank {window.rank})"),
            evidence={"step": first[0].step, "initial_loss": initial, "chance_loss": chance, "classes": classes,
                      "ratio": ratio, "fine_tune": True},
            step=s.step, rank=window.rank,
        )


def _which(first: list[StepRecord]) -> str:
    """Where the judged value comes from, for the summary."""
    if len(first) == 1:
        return f"the loss at step {first[0].step}, the first forward pass, before any update"
    return f"median of the losses at steps {first[0].step}-{first[-1].step}; step 0's is before any update"
