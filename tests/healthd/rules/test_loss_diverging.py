"""healthd.rules.loss_diverging: the loss far above its best, by more than noise on a small loss."""

from __future__ import annotations

from healthd.rules.loss_diverging import LossDiverging
from tests.healthd.factories import healthy_loss, steps, window


def test_loss_diverging() -> None:
    losses = [2.0 - 0.05 * i for i in range(20)] + [1.0 * 1.3**i for i in range(15)]
    f = LossDiverging().evaluate(window(steps(35, loss=losses)))
    assert f is not None and f.evidence["loss_recent"] > 2 * f.evidence["loss_best"]
    assert LossDiverging().evaluate(window(steps(60, loss=healthy_loss))) is None
    # Late-training noise on a tiny loss: doubled, but a small fraction of the progress made.
    noisy = [2.0 * 0.9**i for i in range(40)] + [0.05, 0.03, 0.06, 0.04, 0.07, 0.05, 0.06, 0.05]
    assert LossDiverging().evaluate(window(steps(48, loss=noisy))) is None
