"""RankStalled: a rank stopped making optimizer steps without closing."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, ForSteps, ResolveAfterSteps, Rule, RuleConfig, fmt
from healthd.state.windows import JobWindow, RankStatus
from healthd.wire.schema import Severity


class StallConfig(RuleConfig):
    stall_seconds: float = Field(default=300.0, gt=0, description="no step for this long counts as a stall")
    heartbeat_timeout_seconds: float = Field(
        default=30.0, gt=0, description="a rank with no heartbeat for this long is treated as gone, not hung"
    )
    for_steps: ForSteps = Field(default=1, description="consecutive engine ticks with the finding before firing")
    resolve_after_steps: ResolveAfterSteps = Field(default=3, description="ticks without the finding before resolving")


def stalled_for(st: RankStatus, now: float) -> float | None:
    """Seconds since the rank's last step, or None if it never stepped or closed cleanly."""
    if st.closed or st.last_step_time is None:
        return None
    return now - st.last_step_time


def heartbeat_alive(st: RankStatus, now: float, timeout: float) -> bool:
    return st.last_heartbeat_time is not None and now - st.last_heartbeat_time <= timeout


class RankStalled(Rule[JobWindow, StallConfig]):
    """A rank made no optimizer step for ``stall_seconds`` although it did not close.

    Why: a hung collective (a NCCL/gloo all-reduce waiting for a rank that
    will never come), a deadlocked data loader or a dead worker stop a job
    without an error; the scheduler still counts it as running and it burns
    its allocation. The client's heartbeats come from a background thread,
    independent of steps, so healthd tells a hang (heartbeats go on: the
    process is alive but stuck) from a dead or unreachable process (heartbeats
    stopped too) and from a clean exit (a closing heartbeat: never a finding).

    Thresholds: ``stall_seconds`` (300 s; set it above your longest step,
    checkpoint or evaluation pause) and ``heartbeat_timeout_seconds`` (30 s,
    several client heartbeat periods). Under DDP a stuck rank stalls every
    rank at the next all-reduce: expect this alert on all of them, with
    ``TrainingStalled`` for the job; the rank furthest behind (lowest
    ``last_step``) is the first suspect.
    """

    name: ClassVar[str] = "RankStalled"
    severity: ClassVar[Severity] = Severity.CRITICAL
    Config = StallConfig
    fires_on_silence: ClassVar[bool] = True
    advice: ClassVar[str] = (
        "If heartbeats continue the process is alive but stuck: dump its stacks (py-spy dump --pid, "
        "NCCL / gloo collective timeouts, TORCH_DISTRIBUTED_DEBUG=DETAIL). "
        "If heartbeats stopped, the worker died or lost its network: check the node and the launcher's logs."
    )

    def evaluate(self, window: JobWindow) -> list[Finding]:
        cfg = self.config
        out = []
        for rank, st in sorted(window.ranks.items()):
            idle = stalled_for(st, window.now)
            if idle is None or idle < cfg.stall_seconds:
                continue
            alive = heartbeat_alive(st, window.now, cfg.heartbeat_timeout_seconds)
            what = ("alive (heartbeats continue) but stuck: a hang" if alive
                    else "silent (no heartbeat either): the worker died or is unreachable")
            out.append(Finding(
                summary=f"rank {rank} made no step for {fmt(idle)} s (last step {st.last_step}); it is {what}",
                evidence={"seconds_since_step": round(idle, 3), "last_step": st.last_step,
                          "heartbeat_alive": alive, "stall_seconds": cfg.stall_seconds},
                step=st.last_step, rank=rank,
            ))
        return out
