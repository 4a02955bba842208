"""The whole fault zoo (it takes ~15 s on 2 cores): each fault is caught by its rule, each control stays quiet."""

from __future__ import annotations

import pytest
import torch

from bench.faultzoo.runner import run_one, summarize
from bench.faultzoo.scenarios import SCENARIOS
from healthd.rules import ALL_RULES

# The training-health rules a single CPU process can trip (cluster and GPU rules have their own tests).
TRAINING_RULES = {
    "NonFiniteValues", "ExplodingGradients", "VanishingGradients", "LearningRateTooHigh", "LearningRateTooLow",
    "WeightsNotUpdating", "LossDiverging", "GradientsNotFlowing", "MissingZeroGrad", "EvalModeDuringTraining",
    "SoftmaxBeforeLoss", "LossInputBroadcast", "InitialLossUnexpected", "InputNotNormalized", "DeadActivations",
    "SaturatedActivations", "DropoutBeforeBatchNorm", "BatchNormSmallBatch", "LossOscillating", "LossPlateau",
    "Overfitting", "LargeBatchGeneralization", "LearningRateNotScaled",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_every_single_process_rule_has_a_fault() -> None:
    expected = {s.expected for s in SCENARIOS if s.expected}
    assert TRAINING_RULES <= {r.name for r in ALL_RULES}
    assert TRAINING_RULES - expected == set()
    assert sum(s.expected is None for s in SCENARIOS) >= 8
    assert sum(s.expected is not None for s in SCENARIOS) >= 20


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario) -> None:  # type: ignore[no-untyped-def]
    r = run_one(scenario)
    if scenario.expected is None:
        assert r.false_alarms == [], r.fired
    else:
        assert r.detected, f"{scenario.expected} did not fire; fired: {r.fired}"
        # LossPlateau on shuffled labels is the slowest (95-115 steps on seeds 0-2): judged over 30 steps
        # of noise, its flickering finding must hold at two checkpoints in a row (every
        # engine.max_steps_per_evaluation = 5 step numbers; healthd.engine.scheduler).
        assert r.steps_to_detect is not None and r.steps_to_detect <= 120, r.fired[scenario.expected]


def test_summary_counts() -> None:
    results = [run_one(s) for s in SCENARIOS if s.name in ("forgot_zero_grad", "ctrl_regression_mse")]
    s = summarize(results)
    assert (s["faults"], s["detected"], s["controls"], s["false_alarms"]) == (1, 1, 1, 0)
    assert results[0].pages == ["MissingZeroGrad"] and s["max_pages_per_detected_fault"] == 1
    assert s["median_steps_to_detect"] == results[0].steps_to_detect


def test_the_detection_report_is_the_rendering_of_the_committed_results() -> None:
    from bench.faultzoo.report import DOC, rendered_from

    assert DOC.read_text() == rendered_from(), (
        "docs/faultzoo.md is stale: run `python -m bench.faultzoo --seeds 3` (it rewrites both files)")


def test_the_report_counts_detection_at_warning_or_above_and_marks_seed_flips() -> None:
    from bench.faultzoo.report import render

    def run(name, kind, expected, fired, onset=10, pages=None):
        return {"name": name, "kind": kind, "expected": expected, "onset": onset, "fired": fired, "pages": pages}

    page = render([
        # Loss is LR's consequence (inhibited): one page
        run("lr", "fault", "LR", {"LR": {"step": 14, "severity": "warning"},
                                  "Loss": {"step": 20, "severity": "critical"}}, pages=["LR"]),
        run("lr@1", "fault", "LR", {"LR": {"step": 30, "severity": "info"}}),  # info only: not detected
        run("ok", "control", None, {"Plateau": {"step": 5, "severity": "info"}}),
        run("ok@1", "control", None, {"Diverging": {"step": 5, "severity": "warning"}}),
    ])
    assert "1/2 fault runs" in page and "1/2 control runs" in page
    assert "| lr (flips between seeds) | LR | +4, - | 4 | 4 | 1, - | Loss |" in page
    assert "before incident grouping): median 2, worst 2" in page
    assert "Non-inhibited alerts above info per detected fault run" in page and "median 1, worst 1" in page
    assert "| ok | quiet, Diverging |" in page


def test_pages_are_the_alerts_above_info_no_firing_cause_explains() -> None:
    from bench.faultzoo.runner import pages
    from healthd.engine.alerts import Alert
    from healthd.wire.schema import AlertState, Severity

    def alert(rule, severity=Severity.WARNING, caused_by=None, rank=0, stream=None, fired=True):
        return Alert(id=rule, rule=rule, severity=severity, state=AlertState.FIRING, job="j", rank=rank, layer=None,
                     step=1, last_step=1, summary="", evidence={}, advice="", started_at=0.0, updated_at=0.0,
                     stream=stream, fired_at=1.0 if fired else None, caused_by=caused_by)

    fired = [alert("LearningRateTooHigh"), alert("LossDiverging", Severity.CRITICAL, "LearningRateTooHigh"),
             alert("LossPlateau", Severity.INFO), alert("DeadActivations", fired=False)]
    assert pages(fired) == ["LearningRateTooHigh"]
    # one rule on two ranks is two alerts to Alertmanager (the rank is a label), named by rank
    assert pages([alert("RankDesync", rank=0), alert("RankDesync", rank=1), alert("X", stream="g", rank=1)]) == [
        "RankDesync rank 0", "RankDesync rank 1", "X[g] rank 1"]
