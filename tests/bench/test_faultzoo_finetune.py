"""The zoo's fine-tuning cases (bench/faultzoo/finetune.py), seed 0: controls quiet, each fault by its own rule.

Each case runs once per session (``_result``); the tiny GPT-2 they fine-tune is pretrained once and cached
on disk (``finetune.pretrained``), so a second session skips its ~1 minute of pretraining.
"""

from __future__ import annotations

import pytest
import torch

from bench.faultzoo.runner import Result, run_one
from healthd.wire.schema import Severity

pytest.importorskip("peft")  # the test extra installs it
from bench.faultzoo.finetune import FINAL_LOSS, FINE_TUNE_SCENARIOS  # noqa: E402

BY_NAME = {s.name: s for s in FINE_TUNE_SCENARIOS}
_RESULTS: dict[str, Result] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    torch.set_num_threads(1)


def _result(name: str) -> Result:
    if name not in _RESULTS:
        _RESULTS[name] = run_one(BY_NAME[name])
    return _RESULTS[name]


def test_the_cases_are_the_issues() -> None:
    controls = {s.name for s in FINE_TUNE_SCENARIOS if s.expected is None}
    faults = {s.expected for s in FINE_TUNE_SCENARIOS if s.expected}
    assert len(controls) == 7
    assert faults == {"InitialLossUnexpected", "WeightsNotUpdating", "LearningRateTooHigh", "NonFiniteValues"}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(BY_NAME))
def test_case(name: str) -> None:
    r = _result(name)
    if r.kind == "control":
        assert r.false_alarms == [], r.fired
        return
    assert r.detected, f"{r.expected} did not fire; fired: {r.fired}"
    assert Severity(r.fired[r.expected]["severity"]).level >= Severity.WARNING.level, r.fired
    assert r.steps_to_detect is not None and r.steps_to_detect <= 60, r.fired


def test_nan_is_critical_at_its_own_step() -> None:
    r = _result("ft_nan_in_adapter")
    assert r.fired["NonFiniteValues"]["severity"] == "critical"
    assert r.detect_step == 40


def test_the_optimizer_built_before_the_adapters_names_them() -> None:
    summary = _result("ft_optimizer_before_peft").fired["WeightsNotUpdating"]["summary"]
    assert "8 trainable layers will never train" in summary and "h.0.attn.c_attn:lora" in summary


def test_the_lr_fault_really_hurts() -> None:
    _result("ft_lr_far_too_high")
    _result("ft_ctrl_full_small_lr")
    bad, good = FINAL_LOSS[("ft_lr_far_too_high", 0)], FINAL_LOSS[("ft_ctrl_full_small_lr", 0)]
    assert bad > 1.2 * good, (bad, good)
