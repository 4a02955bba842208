"""LossPlateau: a fine-tune's slow loss and a loss flattening as the LR schedule anneals are not plateaus."""

from __future__ import annotations

import math

import pytest

from healthd.rules.loss_plateau import LossPlateau
from healthd.wire.schema import AttachReport, Hints, Severity
from tests.healthd.factories import steps, window

N = 60


def _noisy(level: list[float], amp: float = 0.05) -> list[float]:
    return [v + amp * math.sin(1.7 * i) for i, v in enumerate(level)]


def _run(loss: list[float], lr: list[float], fine_tune: bool = False, classes: int | None = None
         ) -> Severity | None | str:
    attach = AttachReport(job="j", time=1.0, hints=Hints(fine_tune=fine_tune, num_classes=classes))
    w = window(steps(len(loss), loss=loss, lr=[[v] for v in lr]), attach, lr_peak=max(lr))
    f = LossPlateau().evaluate(w)
    if f is None:
        return "quiet"
    return f.severity or LossPlateau.severity


FLAT = _noisy([2.30] * N)
FLAT_A_NAT_BELOW = _noisy([3.4] * 10 + [2.4] * (N - 10))  # fell one nat, then flat
LORA_SLOW = _noisy([2.38 - 0.002 * i for i in range(N)])  # slow, below noise per window
COSINE = [1e-3 * 0.5 * (1 + math.cos(math.pi * min(1.0, (i + 140) / 200))) for i in range(N)]  # last 30%: ~0
CONST = [1e-3] * N

CASES = [
    ("flat from scratch at constant LR", FLAT, CONST, False, Severity.WARNING),
    ("flat a nat below the start: converged, not stuck", FLAT_A_NAT_BELOW, CONST, False, Severity.INFO),
    ("LoRA fine-tune, slow", LORA_SLOW, CONST, True, "info-or-quiet"),
    ("fine-tune flat at its initial level", FLAT, CONST, True, "info-or-quiet"),
    ("flat while cosine decays to zero", FLAT, COSINE, False, "quiet"),
    ("fine-tune flat while linear decay ends", FLAT, [1e-4 * (1 - i / N) for i in range(N)], True, "quiet"),
    ("flat at a decayed but not annealed LR", FLAT, [0.3e-3] * N, False, Severity.WARNING),
    # the last stretch of a linear schedule: 40% -> 10% of the peak over the window (HF Trainer's default)
    ("flat while linear decay passes a quarter of the peak", FLAT,
     [1e-3] + [1e-3 * (0.4 - 0.3 * i / (N - 2)) for i in range(N - 1)], False, "quiet"),
    ("flat at a step schedule's fifth of the peak, not falling", FLAT, [1e-3] + [0.2e-3] * (N - 1), False,
     Severity.WARNING),
]


@pytest.mark.parametrize(("name", "loss", "lr", "fine_tune", "expected"), CASES, ids=[c[0] for c in CASES])
def test_plateau_table(name: str, loss: list[float], lr: list[float], fine_tune: bool,
                       expected: Severity | str) -> None:
    got = _run(loss, lr, fine_tune)
    if expected == "info-or-quiet":
        assert got in ("quiet", Severity.INFO), name
    else:
        assert got == expected, name


def test_near_means_near_in_the_summary() -> None:
    attach = AttachReport(job="j", time=1.0, hints=Hints())
    w = window(steps(N, loss=FLAT_A_NAT_BELOW, lr=[[1e-3]] * N), attach, lr_peak=1e-3)
    f = LossPlateau().evaluate(w)
    assert f is not None and "near its initial" not in f.summary


# Fine-tunes nothing told healthd about (a plain load_state_dict, no hint): the step-0 loss says it.
UNSEEN = [
    # an LM over 256 tokens starting at 2.38 = 0.43x ln(256), the run: slow, as a fine-tune is
    ("unseen LM fine-tune, slow", LORA_SLOW, 256, "info-or-quiet"),
    ("unseen fine-tune flat at its start", FLAT, 256, "info-or-quiet"),
    # the same series over 10 classes starts at chance (ln 10 = 2.30): a run from scratch that never left it
    ("flat at chance from scratch", FLAT, 10, Severity.WARNING),
    ("no class count: from scratch as before", FLAT, None, Severity.WARNING),
]


@pytest.mark.parametrize(("name", "loss", "classes", "expected"), UNSEEN, ids=[c[0] for c in UNSEEN])
def test_a_fine_tune_healthd_cannot_see_is_known_by_its_first_loss(name: str, loss: list[float],
                                                                   classes: int | None,
                                                                   expected: Severity | str) -> None:
    got = _run(loss, CONST, classes=classes)
    if expected == "info-or-quiet":
        assert got in ("quiet", Severity.INFO), name
    else:
        assert got == expected, name
