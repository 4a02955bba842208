"""TrainingStalled: no rank of the job made a step for a while, and the job did not finish."""

from __future__ import annotations

from typing import ClassVar

from healthd.rules.base import Finding, Rule, fmt
from healthd.rules.rank_stalled import StallConfig, heartbeat_alive, stalled_for
from healthd.state.windows import JobWindow
from healthd.wire.schema import Severity


class TrainingStalled(Rule[JobWindow, StallConfig]):
    """Every rank that has not closed made no step for ``stall_seconds``.

    Why: the whole job stopped progressing (typically a collective waiting
    for one stuck or dead rank, or a shared dependency such as a storage
    mount or the rendezvous store gone) while the scheduler still shows it
    running. Same thresholds as ``RankStalled`` (configured separately);
    a job whose ranks all closed cleanly is finished, not stalled. The
    evidence lists how many ranks still send heartbeats (hang) and which rank
    is furthest behind.
    """

    name: ClassVar[str] = "TrainingStalled"
    severity: ClassVar[Severity] = Severity.CRITICAL
    Config = StallConfig
    fires_on_silence: ClassVar[bool] = True
    advice: ClassVar[str] = (
        "The job is not progressing. Look at RankStalled alerts for the rank furthest behind, dump stacks of "
        "the live ranks (py-spy dump), and check the launcher for a dead worker; consider collective timeouts "
        "(init_process_group(timeout=...)) so a hang becomes an error."
    )

    def evaluate(self, window: JobWindow) -> Finding | None:
        cfg = self.config
        live = {r: st for r, st in window.ranks.items() if not st.closed}
        if not live:
            return None
        idle = {r: stalled_for(st, window.now) for r, st in live.items()}
        if any(v is None or v < cfg.stall_seconds for v in idle.values()):
            return None
        behind = min(live, key=lambda r: (live[r].last_step if live[r].last_step is not None else -1, r))
        alive = sum(heartbeat_alive(st, window.now, cfg.heartbeat_timeout_seconds) for st in live.values())
        least_idle = min(v for v in idle.values() if v is not None)
        return Finding(
            summary=(f"no step on any of {len(live)} ranks for {fmt(least_idle)} s; {alive} still send heartbeats; "
                     f"rank {behind} is furthest behind (last step {live[behind].last_step})"),
            evidence={"seconds_since_step": round(least_idle, 3), "ranks": len(live), "ranks_heartbeat_alive": alive,
                      "rank_furthest_behind": behind, "stall_seconds": cfg.stall_seconds},
            step=live[behind].last_step,
        )
