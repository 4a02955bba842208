"""LossOscillating on fine-tunes: minibatch noise around a loss far below chance is convergence, not oscillation."""

from __future__ import annotations

import pytest

from healthd.rules.loss_oscillating import LossOscillating
from healthd.wire.schema import AttachReport, Hints
from tests.healthd.factories import ce, step, steps, window

N = 40
LOW_NOISY = [0.06 if i % 2 else 0.02 for i in range(N)]  # a pretrained model's loss: swings ~ its level
HIGH_NOISY = [3.0 if i % 2 else 1.0 for i in range(N)]  # above chance ln(10) = 2.3 half the time


@pytest.mark.parametrize(("loss", "fine_tune", "classes", "fires"), [
    (LOW_NOISY, True, 10, False),  # far below chance: the noise regime of a converged model
    # no hint, but a step-0 loss of 0.02 << ln(10): trained weights loaded where healthd cannot see it
    (LOW_NOISY, False, 10, False),
    (LOW_NOISY, False, None, True),  # no hint and no chance level: judged as before
    (HIGH_NOISY, False, 10, True),  # starts at 1.0, 0.43x chance: a fine-tune, thrashing around chance
    (LOW_NOISY, True, None, True),  # no chance level to judge against: as before
    (HIGH_NOISY, True, 10, True),  # a fine-tune thrashing around chance is oscillating
])
def test_fine_tune_table(loss: list[float], fine_tune: bool, classes: int | None, fires: bool) -> None:
    attach = AttachReport(job="j", time=1.0, hints=Hints(num_classes=classes, fine_tune=fine_tune))
    assert (LossOscillating().evaluate(window(steps(N, loss=loss), attach)) is not None) is fires


def test_classes_of_the_inspected_loss_input_count_too() -> None:
    """No num_classes hint: C comes from the cross_entropy input healthd inspected (an LM's vocabulary)."""
    lm = [step(0, loss=LOW_NOISY[0], loss_inputs=[ce()]), *steps(N - 1, start=1, loss=LOW_NOISY[1:])]
    attach = AttachReport(job="j", time=1.0, hints=Hints())
    assert LossOscillating().evaluate(window(lm, attach)) is None
