"""Who this process is in the job: rank, world size, host, run id, git commit.

Sources, first match wins: explicit arguments; Ray Train's context inside a
``TorchTrainer`` worker (``ray.train.get_context()``: world/local/node rank,
world size, experiment name as the run id; Ray 2.60 runs Train V2, where
``get_trial_name()`` raises, so it is never called); torch.distributed when it
is initialised; the environment variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, GROUP_RANK, TORCHELASTIC_RUN_ID); else a single process. Ray is
only consulted if the process already imported ``ray.train`` (a train_func
does), so the identity is never the reason Ray or torch gets imported.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass

# Environment variables that name one launch of a job, first match wins. All
# ranks of a launch see the same value, unlike anything generated per process.
_RUN_ID_ENV = ("HEALTHD_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


@dataclass(frozen=True)
class Identity:
    """The position of this process in its job."""

    rank: int
    world_size: int
    local_rank: int
    hostname: str
    run_id: str | None
    node_rank: int | None = None  # index of the node (torchrun GROUP_RANK, Ray Train node rank)
    launcher: str = "single"  # "ray_train", "torch.distributed", "env" or "single"


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _distributed_rank_world() -> tuple[int, int] | None:
    # Only look at torch.distributed if the process already imported it: the
    # identity must not be the reason torch gets imported.
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    try:
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except Exception:  # a half-initialised process group is not our problem
        return None
    return None


@dataclass(frozen=True)
class _RayTrain:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int | None
    experiment: str | None


def _ray_train_context() -> _RayTrain | None:
    train = sys.modules.get("ray.train")
    if train is None:
        return None
    try:
        ctx = train.get_context()
        rank, world_size, local_rank = int(ctx.get_world_rank()), int(ctx.get_world_size()), int(ctx.get_local_rank())
    except Exception:  # not inside a Ray Train worker
        return None
    node_rank: int | None = None
    experiment: str | None = None
    with contextlib.suppress(Exception):  # optional in older Ray / local mode
        node_rank = int(ctx.get_node_rank())
    with contextlib.suppress(Exception):
        experiment = str(ctx.get_experiment_name()) or None
    return _RayTrain(rank, world_size, local_rank, node_rank, experiment)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/@+\-]")
_UNSAFE_HOST = re.compile(r"[^A-Za-z0-9_.:\-]")


def label_safe(text: str, max_chars: int = 128) -> str:
    """``text`` as healthd accepts it where it may become a label value (schema.LABEL_SAFE_PATTERN):
    other characters become ``_``, and it is cut to ``max_chars``."""
    return _UNSAFE.sub("_", text)[:max_chars]


def hostname() -> str:
    """This host's name as healthd accepts it (schema.HostName)."""
    return _UNSAFE_HOST.sub("_", socket.gethostname())[:253]


def detect_identity(rank: int | None = None, world_size: int | None = None) -> Identity:
    """Rank and world size: arguments, then Ray Train, then torch.distributed, then env, then 0/1."""
    ray = _ray_train_context()
    if ray is not None:
        return _checked(Identity(
            rank=ray.rank if rank is None else rank,
            world_size=ray.world_size if world_size is None else world_size,
            local_rank=ray.local_rank,
            hostname=hostname(),
            run_id=(os.environ.get("HEALTHD_RUN_ID") or ray.experiment or "")[:256] or None,
            node_rank=ray.node_rank,
            launcher="ray_train",
        ))
    from_dist = _distributed_rank_world()
    launcher = "torch.distributed" if from_dist else ("env" if _env_int("WORLD_SIZE") is not None else "single")
    if rank is None:
        rank = from_dist[0] if from_dist else _env_int("RANK")
    if world_size is None:
        world_size = from_dist[1] if from_dist else _env_int("WORLD_SIZE")
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    local_rank = _env_int("LOCAL_RANK")
    node_rank = _env_int("GROUP_RANK")
    run_id = next((os.environ[n] for n in _RUN_ID_ENV if os.environ.get(n)), None)
    return _checked(Identity(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank if local_rank is not None and local_rank >= 0 else 0,
        hostname=hostname(),
        run_id=run_id[:256] if run_id else None,
        node_rank=node_rank if node_rank is not None and node_rank >= 0 else None,
        launcher=launcher,
    ))


def _checked(identity: Identity) -> Identity:
    rank, world_size = identity.rank, identity.world_size
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if world_size < 1 or rank >= world_size:
        raise ValueError(f"world_size must be >= 1 and > rank, got world_size={world_size}, rank={rank}")
    return identity


def git_commit(timeout_seconds: float = 1.0) -> str | None:
    """``git rev-parse HEAD`` in the working directory, or None (no git, no repo, too slow)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
            check=False,
            cwd=os.getcwd(),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    if done.returncode != 0 or not commit:
        return None
    return commit[:256]
