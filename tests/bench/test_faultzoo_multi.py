"""The zoo's cases with several models and optimizers (bench/faultzoo/multi.py), seed 0: controls quiet, each
fault by its own rule on the stream of the broken model.

Each case runs once per session (``_result``); all of them take about three minutes on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch

from bench.faultzoo.runner import Result, alert_key, run_one
from healthd.wire.schema import Severity

pytest.importorskip("transformers")
pytest.importorskip("lightning")
from bench.faultzoo.multi import MULTI_SCENARIOS  # noqa: E402

BY_NAME = {s.name: s for s in MULTI_SCENARIOS}
_RESULTS: dict[str, Result] = {}
# Each of a rank's first engine.dense_checkpoint_steps (10) steps is a checkpoint: a fault present from step 0
# is judged at the step it shows; the issue asks for a missing zero_grad within 3 steps.
MISSING_ZERO_GRAD_STEPS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    torch.set_num_threads(1)


def _result(name: str) -> Result:
    if name not in _RESULTS:
        _RESULTS[name] = run_one(BY_NAME[name])
    return _RESULTS[name]


def test_the_cases_are_the_issues() -> None:
    controls = {s.name for s in MULTI_SCENARIOS if s.expected is None}
    faults = {(s.expected, s.stream) for s in MULTI_SCENARIOS if s.expected}
    assert len(controls) == 6
    assert faults == {("MissingZeroGrad", "generator"), ("LearningRateTooHigh", "discriminator"),
                      ("NonFiniteValues", None), ("GradientsNotFlowing", "generator")}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_case(name: str) -> None:
    r = _result(name)
    if r.kind == "control":
        assert r.false_alarms == [], r.fired
        return
    assert r.expected is not None
    fired = r.fired[alert_key(r.expected, r.stream)]
    assert r.detected and fired["stream"] == r.stream, r.fired
    assert Severity(fired["severity"]).level >= Severity.WARNING.level, r.fired
    assert r.steps_to_detect is not None and r.steps_to_detect <= 30, r.fired


def test_a_missing_zero_grad_is_critical_on_its_own_stream_within_3_steps() -> None:
    r = _result("multi_gan_missing_zero_grad_g")
    assert r.fired["MissingZeroGrad[generator]"]["severity"] == "critical"
    assert r.steps_to_detect is not None and r.steps_to_detect <= MISSING_ZERO_GRAD_STEPS
    assert "MissingZeroGrad[discriminator]" not in r.fired  # the generator's loss flows through it: not stale


def test_a_nan_under_the_trainer_is_critical_at_its_step_with_the_real_loss() -> None:
    r = _result("multi_hf_trainer_nan")
    nf = r.fired["NonFiniteValues"]
    assert nf["severity"] == "critical" and r.detect_step == 40
    assert "loss=nan" in nf["summary"] and "loss=0.0" not in nf["summary"], nf["summary"]
