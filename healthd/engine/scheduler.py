"""When rank-scoped rules run: a queue of ranks with steps not yet evaluated, and a CPU budget.

Rules cost the same whether an evaluation covers one new step or fifty (they read windows), so
what bounds their cost is how often a rank is evaluated, not how many steps it reports. At low
load every request's ranks are evaluated before it is answered, as if the budget were not there.
Under load, rank rules get ``engine.rank_rules_cpu_share`` of the server's time: a rank whose
evaluation does not fit waits in the queue, oldest first, and its next evaluation covers every
step it reported meanwhile (``RankWindow.new``), so no step goes unseen: events keep their exact
step, only the moment the alert changes comes later. The delay is exported
(``healthd_rank_evaluation_delay_seconds``) so an operator sees what the budget costs.

What lives here: the queue and the budget (a token bucket of CPU seconds). What does not: the
rules and alert state (``healthd.engine.alerts``), or who calls it (``healthd.server.app``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

RankKey = tuple[str, int, str | None]  # (job, rank, stream)


class EvaluationQueue:
    """Ranks with unevaluated steps, oldest first, and the CPU seconds rank rules may still spend.

    The budget refills at ``share`` seconds per second of wall time up to ``burst_seconds``; each
    evaluation is charged what it took (``charge``), so the bucket may go negative after an urgent
    evaluation and later ones wait until it has paid back. ``share >= 1`` means no budget.
    """

    __slots__ = ("share", "burst_seconds", "_timer", "_tokens", "_refilled", "_pending")

    def __init__(self, share: float, burst_seconds: float, timer: Callable[[], float] = time.perf_counter) -> None:
        self.share = share
        self.burst_seconds = burst_seconds
        self._timer = timer
        self._tokens = burst_seconds
        self._refilled = timer()
        # (job, rank) -> [steps not evaluated yet, wall time the oldest of them arrived]
        self._pending: OrderedDict[RankKey, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: RankKey, now: float, steps: int = 1) -> int:
        """Count ``steps`` new steps of ``key``; returns how many of its steps now wait."""
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = [steps, now]
            return steps
        entry[0] += steps
        return int(entry[0])

    def waiting(self, key: RankKey) -> int:
        """How many of ``key``'s steps wait (0 if it is not queued)."""
        entry = self._pending.get(key)
        return int(entry[0]) if entry is not None else 0

    def take(self, key: RankKey) -> int:
        """Remove ``key`` from the queue; returns its waiting steps (0 if it was not queued)."""
        entry = self._pending.pop(key, None)
        return int(entry[0]) if entry is not None else 0

    def oldest(self) -> RankKey | None:
        """The rank that has waited longest, or None."""
        return next(iter(self._pending), None)

    def keys(self, job: str | None = None) -> list[RankKey]:
        """Queued ranks, oldest first (of one job if given)."""
        return [k for k in self._pending if job is None or k[0] == job]

    def drop_job(self, job: str) -> None:
        for key in self.keys(job):
            del self._pending[key]

    def oldest_since(self) -> float | None:
        """When the oldest waiting step arrived (wall time), or None if nothing waits."""
        key = self.oldest()
        return self._pending[key][1] if key is not None else None

    # ------------------------------------------------------------- budget
    def has_budget(self) -> bool:
        if self.share >= 1.0:
            return True
        t = self._timer()
        self._tokens = min(self.burst_seconds, self._tokens + (t - self._refilled) * self.share)
        self._refilled = t
        return self._tokens > 0.0

    def charge(self, seconds: float) -> None:
        if self.share < 1.0:
            self._tokens -= seconds
