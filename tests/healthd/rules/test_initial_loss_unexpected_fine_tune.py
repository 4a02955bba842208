"""InitialLossUnexpected on fine-tunes: below chance is success; at chance (many classes) the weights did not load."""

from __future__ import annotations

import math

import pytest

from healthd.rules.initial_loss_unexpected import InitialLossUnexpected
from healthd.wire.schema import AttachReport, Hints, Severity
from tests.healthd.factories import steps, window


def _attach(classes: int, fine_tune: bool) -> AttachReport:
    return AttachReport(job="j", time=1.0, hints=Hints(num_classes=classes, fine_tune=fine_tune))


# (classes, first loss as a multiple of ln(classes), fine_tune, expected severity or "quiet")
CASES = [
    # the run: a pretrained byte-level LM starts at 2.38 = 0.43x ln(256)
    (256, 2.38 / math.log(256), True, "quiet"),
    # without the hint the same loss is most likely a fine-tune healthd cannot see (a plain load_state_dict)
    (256, 2.38 / math.log(256), False, Severity.INFO),
    (32000, 0.2, False, Severity.INFO),
    (10, 0.6, False, Severity.INFO),  # below chance by more than info_factor (1.5x)
    (10, 0.7, False, "quiet"),  # by less
    (50257, 0.25, True, "quiet"),  # GPT-2 vocabulary, pretrained
    (32000, 0.6, True, "quiet"),  # below chance by less: still a pretrained model's
    (256, 1.0, True, Severity.WARNING),  # at chance: the weights did not load
    (32000, 1.05, True, Severity.WARNING),
    (256, 0.8, True, Severity.WARNING),  # within info_factor of chance: untrained
    (256, 1.0, False, "quiet"),  # from scratch, at chance is right
    (10, 1.0, True, "quiet"),  # fresh classification head on a pretrained body
    (2, 1.0, True, "quiet"),
    (10, 0.3, True, "quiet"),
    (256, 5.0, True, Severity.WARNING),  # far above chance is broken either way
    (10, 1.7, True, Severity.INFO),
]


@pytest.mark.parametrize(("classes", "ratio", "fine_tune", "expected"), CASES)
def test_fine_tune_table(classes: int, ratio: float, fine_tune: bool, expected: Severity | str) -> None:
    chance = math.log(classes)
    w = window(steps(5, loss=[ratio * chance, *[0.9 * ratio * chance] * 4]), _attach(classes, fine_tune))
    f = InitialLossUnexpected().evaluate(w)
    if expected == "quiet":
        assert f is None, f.summary if f else None
        return
    assert f is not None
    assert (f.severity or InitialLossUnexpected.severity) is expected, f.summary
    assert f.evidence["initial_loss"] == pytest.approx(ratio * chance)
    assert f.evidence["chance_loss"] == pytest.approx(chance)
    if fine_tune:
        assert f.evidence["fine_tune"] is True and "fine-tune" in f.summary
    if fine_tune and 0.6 < ratio < 1.5:
        assert "did not load" in f.summary
    if not fine_tune and ratio < 1:  # both readings, and how to say which
        assert "trained weights" in f.summary and "attach(fine_tune=True)" in f.summary
        assert "labels leak into the inputs" in f.summary and f.evidence["fine_tune"] is False


def test_the_hint_defaults_to_a_run_from_scratch() -> None:
    assert Hints().fine_tune is False
    w = window(steps(3, loss=2.38), AttachReport(job="j", time=1.0, hints=Hints(num_classes=256)))
    f = InitialLossUnexpected().evaluate(w)
    assert f is not None and f.severity is Severity.INFO  # below chance: an info, whatever the hint


def test_above_chance_without_the_hint_still_warns() -> None:
    w = window(steps(3, loss=3 * math.log(256)), AttachReport(job="j", time=1.0, hints=Hints(num_classes=256)))
    f = InitialLossUnexpected().evaluate(w)
    assert f is not None and f.severity is None  # the rule's own severity: warning
