import pytest

from healthd_client.identity import detect_identity, git_commit, hostname, label_safe


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HEALTHD_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_defaults():
    identity = detect_identity()
    assert (identity.rank, identity.world_size, identity.local_rank, identity.run_id) == (0, 1, 0, None)
    assert identity.hostname


def test_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    identity = detect_identity()
    assert (identity.rank, identity.world_size, identity.local_rank, identity.run_id) == (3, 8, 1, "abc")


def test_arguments_override_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    identity = detect_identity(rank=1, world_size=2)
    assert (identity.rank, identity.world_size) == (1, 2)


def test_invalid_rank():
    with pytest.raises(ValueError, match="world_size"):
        detect_identity(rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        detect_identity(rank=-1)


def test_git_commit_outside_a_repository_is_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit() is None


def test_git_commit_in_this_repository():
    commit = git_commit()
    assert commit is None or len(commit) == 40


def test_hostname_and_labels_are_what_healthd_accepts(monkeypatch):
    import socket
    monkeypatch.setattr(socket, "gethostname", lambda: "my host (gpu)\n")
    assert hostname() == "my_host__gpu__" and detect_identity().hostname == "my_host__gpu__"
    assert label_safe('GPU-1"} x', 8) == "GPU-1___"
