"""Identity under launchers: Ray Train V2's context, torchrun's node rank."""

from __future__ import annotations

import sys
import types

import pytest

from healthd_client.identity import detect_identity


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "HEALTHD_RUN_ID", "TORCHELASTIC_RUN_ID",
                 "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


class V2Context:
    """What ray.train.get_context() gives in a Train V2 worker: get_trial_name() raises there."""

    def get_world_rank(self) -> int:
        return 3

    def get_world_size(self) -> int:
        return 4

    def get_local_rank(self) -> int:
        return 1

    def get_node_rank(self) -> int:
        return 1

    def get_experiment_name(self) -> str:
        return "exp-7"

    def get_trial_name(self) -> str:
        raise RuntimeError("get_trial_name is not available in Ray Train V2")


def fake_ray_train(context: object | None) -> types.ModuleType:
    mod = types.ModuleType("ray.train")

    def get_context() -> object:
        if context is None:
            raise RuntimeError("Ray Train function utilities not initialized.")
        return context

    mod.get_context = get_context  # type: ignore[attr-defined]
    return mod


def test_ray_train_v2_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.train", fake_ray_train(V2Context()))
    monkeypatch.setenv("RANK", "0")  # Ray's context wins over the environment
    ident = detect_identity()
    assert (ident.rank, ident.world_size, ident.local_rank, ident.node_rank) == (3, 4, 1, 1)
    assert ident.run_id == "exp-7" and ident.launcher == "ray_train"


def test_ray_imported_outside_a_worker_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.train", fake_ray_train(None))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    ident = detect_identity()
    assert (ident.rank, ident.world_size, ident.node_rank, ident.launcher) == (1, 2, 0, "env")


def test_ray_context_with_arguments_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.train", fake_ray_train(V2Context()))
    assert detect_identity(rank=0).rank == 0
    with pytest.raises(ValueError, match="world_size"):
        detect_identity(rank=4)


def test_job_name_from_experiment() -> None:
    from healthd_client.integrations.ray_train import job_name

    assert job_name("TorchTrainer_2026-11-23 16:00") == "TorchTrainer_2026-11-23-16:00"
    assert job_name("__") == "ray-train"
