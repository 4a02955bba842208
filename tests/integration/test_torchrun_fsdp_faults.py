"""Faults in real torchrun FSDP2 jobs (2 ranks, gloo, CPU): each is caught by its rule, a control is quiet.

fsdp_train.py injects the fault (FSDP_FAULT); healthd gets only each rank's shard parts. A NaN in one
rank's batch poisons both ranks' gradient shards (the reduce-scatter adds it in); a NaN written into
one rank's own gradient shard is seen by that rank alone, and healthd combines the ranks' non-finite
tensors so both ranks report the full gradient's count at that step. Under HSDP (4 ranks, 2 x 2), one
replica's shard nudged away from the other's is ``RankDesync`` on that rank, in FSDP2 and FSDP1 alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from healthd.server.embedded import Embedded, serve_in_thread
from healthd.settings import Settings
from healthd.wire.schema import Severity
from tests.integration.test_torchrun_ddp import alerts
from tests.integration.test_torchrun_fsdp import SCRIPT, run_job

pytestmark = pytest.mark.integration

FAULT_STEP = 10  # as in fsdp_train.py
LOUD = {Severity.WARNING.value, Severity.CRITICAL.value}


@pytest.fixture
def healthd() -> Iterator[Embedded]:
    with serve_in_thread(Settings(engine={"tick_seconds": 0.25})) as hd:
        yield hd


def loud(hd: Embedded, job: str) -> list[dict[str, Any]]:
    return [a for a in alerts(hd, job) if a["severity"] in LOUD]


@pytest.mark.parametrize("fault", ["nan_batch", "nan_shard"])
def test_nan_in_one_rank_is_non_finite_values_at_that_step(healthd: Embedded, tmp_path: Path, fault: str) -> None:
    job = f"fsdp2-{fault}"
    run_job(healthd, job, tmp_path, ranks=2, replicas=1, FSDP_FAULT=fault)
    found = {a["rank"]: a for a in alerts(healthd, job) if a["rule"] == "NonFiniteValues"}
    assert sorted(found) == [0, 1], alerts(healthd, job)
    for a in found.values():
        assert a["severity"] == Severity.CRITICAL.value and a["step"] == FAULT_STEP, a
        assert a["evidence"]["nonfinite_grad_tensors"] >= 1, a
    steps = {r: next(s for s in healthd.hd.store.jobs[job].ranks[r].steps if s.step == FAULT_STEP) for r in (0, 1)}
    if fault == "nan_shard":
        # One tensor (layer 0's weight) is non-finite in the full gradient, though only rank 1's shard of it is:
        # both ranks carry the job's count, as they carry its gradient norm.
        assert [steps[r].nonfinite.grads for r in (0, 1)] == [1, 1]
        assert found[0]["layer"] == found[1]["layer"] == "0", found


def test_lr_times_100_is_learning_rate_too_high(healthd: Embedded, tmp_path: Path) -> None:
    job = "fsdp2-lr100"
    run_job(healthd, job, tmp_path, ranks=2, replicas=1, FSDP_FAULT="lr100")
    found = [a for a in loud(healthd, job) if a["rule"] == "LearningRateTooHigh"]
    assert found, alerts(healthd, job)


def test_frozen_layer_is_gradients_not_flowing(healthd: Embedded, tmp_path: Path) -> None:
    job = "fsdp2-frozen"
    run_job(healthd, job, tmp_path, ranks=2, replicas=1, FSDP_FAULT="frozen")
    found = [a for a in loud(healthd, job) if a["rule"] == "GradientsNotFlowing"]
    assert found and all(a["layer"] == "2" for a in found), alerts(healthd, job)


def test_control_is_quiet(healthd: Embedded, tmp_path: Path) -> None:
    job = "fsdp2-control"
    run_job(healthd, job, tmp_path, ranks=2, replicas=1)
    # LossPlateau left out, as in test_torchrun_fsdp: 30 steps at lr 1e-3 learn slowly, which that rule
    # rightly says (the faults above are caught by their own rules, not by it).
    assert [(a["rule"], a["rank"]) for a in loud(healthd, job) if a["rule"] != "LossPlateau"] == []


@pytest.mark.parametrize("script", ["fsdp_train.py", "fsdp1_train.py"])
def test_hsdp_replica_divergence_is_rank_desync(healthd: Embedded, tmp_path: Path, script: str) -> None:
    """Rank 2 holds the same shard as rank 0 in the other replica: only that pair disagrees, and the rule
    names rank 2 against rank 0 (the group of the lowest rank is the reference in a tie)."""
    job = f"hsdp-desync-{script.split('_')[0]}"
    run_job(healthd, job, tmp_path, ranks=4, replicas=2, script=SCRIPT.with_name(script), FSDP_FAULT="desync")
    found = [a for a in alerts(healthd, job) if a["rule"] == "RankDesync"]
    assert found and {a["rank"] for a in found} == {2}, alerts(healthd, job)
    assert all(a["evidence"]["reference_rank"] == 0 and a["step"] >= FAULT_STEP for a in found), found
