"""Who this process is in the job: rank, world size, host, run id, git commit.

Kept deliberately simple: torch.distributed when it is initialised, else the
environment variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), else a
single process. Launcher-specific detection (Ray, SLURM arrays ...) extends
``detect_identity`` without changing its callers.
"""

from __future__ import annotations

import os
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


def detect_identity(rank: int | None = None, world_size: int | None = None) -> Identity:
    """Rank and world size: arguments, then torch.distributed, then env, then 0/1."""
    from_dist = _distributed_rank_world()
    if rank is None:
        rank = from_dist[0] if from_dist else _env_int("RANK")
    if world_size is None:
        world_size = from_dist[1] if from_dist else _env_int("WORLD_SIZE")
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if world_size < 1 or rank >= world_size:
        raise ValueError(f"world_size must be >= 1 and > rank, got world_size={world_size}, rank={rank}")
    local_rank = _env_int("LOCAL_RANK")
    run_id = next((os.environ[n] for n in _RUN_ID_ENV if os.environ.get(n)), None)
    return Identity(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank if local_rank is not None and local_rank >= 0 else 0,
        hostname=socket.gethostname()[:256],
        run_id=run_id[:256] if run_id else None,
    )


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
