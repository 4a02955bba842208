"""When rank-scoped rules run: checkpoints that depend on the steps alone, a queue, and a CPU budget.

Alerts are a function of the series alone. A rank's rules judge *checkpoints*, steps chosen by
their step numbers only: the rank's first ``engine.dense_checkpoint_steps`` steps (mistakes made at
the start, a missing ``zero_grad`` or a wrong initial loss, show there), each step that enters a new
block of ``engine.max_steps_per_evaluation`` step numbers, and each NaN/Inf step and the step before it.
Each checkpoint is judged on the window as it was when that step arrived
(``Store.rank_window(as_of=...)``), and it counts the steps since the previous judged checkpoint
(a rank's last step is one too once its monitor closes or its job expires)
(``RankWindow.new``), so the same steps give the same findings however they were split into
requests and whenever the judging happens.

Rules cost the same whether a checkpoint covers one new step or fifty (they read windows), so what
bounds their cost is how many checkpoints are judged. At low load every checkpoint a request brings
is judged before it is answered, as if the budget were not there. Under load rank rules get
``engine.rank_rules_cpu_share`` of the server's time: a rank whose checkpoints do not fit waits in
the queue, oldest first, and they are judged later, each on its own window: the alerts come later,
not different. The delay is exported (``healthd_rank_evaluation_delay_seconds``).

The budget stays a cap, and the budget is CPU time (the evaluating thread's), so a machine busy
with other work does not use it up faster. A checkpoint is kept waiting only while its window can
still be rebuilt (the caller sheds those more than half of ``store.detail_steps`` behind) and for
at most ``engine.max_checkpoint_lag_seconds``: past that the server is behind, and a rank's
checkpoints but its newest are *shed* (counted, ``healthd_rank_checkpoints_shed_total``), so a
revisit costs one evaluation again, as before checkpoints. The next judged checkpoint still covers
the shed steps as new steps, but the alerts may then differ from an unloaded server's: that is the
guarantee's limit, and the counter says when it was reached. A NaN/Inf checkpoint is judged at
once, budget or not; so is a rank's newest checkpoint when the steps since its last judged one would
no longer fit the store's window (no step goes unseen: at most one evaluation per half window of a
rank's steps overdraws the budget).

What lives here: checkpoints, the queue and the budget (a token bucket of CPU seconds). What does
not: the rules and alert state (``healthd.engine.alerts``), or who calls it
(``healthd.server.pipeline``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

RankKey = tuple[str, int, str | None]  # (job, rank, stream)


@dataclass(slots=True)
class _Rank:
    last_step: int | None = None  # the step number of the newest step seen
    judged: int = 0  # the rank's steps_total at its last judged checkpoint
    since: float = 0.0  # wall time the oldest waiting checkpoint arrived
    waiting: list[int] = field(default_factory=list)  # steps_total at each waiting checkpoint, ascending


class EvaluationQueue:
    """Ranks with checkpoints not judged yet, oldest first, and the CPU seconds rank rules may still spend.

    A checkpoint is named by the rank's ``steps_total`` at it (the how-many-th step it was). The
    budget refills at ``share`` seconds per second of wall time up to ``burst_seconds``; each
    evaluation is charged what it took (``charge``), so the bucket may go negative after an urgent
    evaluation and later ones wait until it has paid back. ``share >= 1`` means no budget.
    """

    __slots__ = ("share", "burst_seconds", "shed_total", "_timer", "_tokens", "_refilled", "_ranks", "_pending")

    def __init__(self, share: float, burst_seconds: float, timer: Callable[[], float] = time.perf_counter) -> None:
        self.share = share
        self.burst_seconds = burst_seconds
        self.shed_total = 0  # checkpoints dropped unjudged because their rank fell too far behind
        self._timer = timer
        self._tokens = burst_seconds
        self._refilled = timer()
        self._ranks: dict[RankKey, _Rank] = {}
        self._pending: OrderedDict[RankKey, _Rank] = OrderedDict()  # the ranks with waiting checkpoints

    def __len__(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------- checkpoints
    def observe(self, key: RankKey, now: float, steps_total: int, steps: Iterable[tuple[int, bool]],
                every: int, dense: int = 0) -> bool:
        """Queue the checkpoints among a rank's newly applied steps, given as (step number, has a
        NaN/Inf) in order, the last being its ``steps_total``-th step; each of its first ``dense`` steps
        is one. Returns whether one is urgent (a NaN/Inf: judge the rank now, budget or not)."""
        steps = list(steps)
        total = steps_total - len(steps)
        r = self._ranks.get(key)
        if r is None or total < r.judged or r.waiting and total < r.waiting[-1]:  # new, or its state was reset
            self._pending.pop(key, None)
            r = self._ranks[key] = _Rank()
        previous = r.last_step
        urgent = False
        for step, nonfinite in steps:
            total += 1
            if nonfinite:
                urgent = True
                if previous is not None:  # after a NaN the shape rules go quiet: judge the step before it too
                    self._queue(key, r, total - 1, now)
                self._queue(key, r, total, now)
            elif previous is None or total <= dense or step // every != previous // every:
                self._queue(key, r, total, now)
            previous = step
        r.last_step = previous
        return urgent

    def finish(self, key: RankKey, now: float, steps_total: int) -> None:
        """Queue a checkpoint at the rank's last step: its monitor closed, or its job is about to be
        forgotten, so no later checkpoint would judge the steps since the previous one."""
        r = self._ranks.get(key)
        if r is not None and steps_total:
            self._queue(key, r, steps_total, now)

    def _queue(self, key: RankKey, r: _Rank, total: int, now: float) -> None:
        if total <= r.judged or r.waiting and total <= r.waiting[-1]:
            return  # judged or queued already
        if not r.waiting:
            r.since = now
            self._pending[key] = r
        r.waiting.append(total)

    def waiting(self, key: RankKey) -> int:
        """How many of ``key``'s checkpoints wait (0 if none)."""
        r = self._pending.get(key)
        return len(r.waiting) if r is not None else 0

    def take(self, key: RankKey) -> list[tuple[int, int]]:
        """Remove ``key`` from the queue; returns its waiting checkpoints, oldest first, each as (its
        steps_total, the steps since the previous judged checkpoint)."""
        r = self._pending.pop(key, None)
        if r is None:
            return []
        out = []
        previous = r.judged
        for total in r.waiting:
            out.append((total, max(1, total - previous)))
            previous = total
        r.judged = previous
        r.waiting = []
        return out

    def shed(self, key: RankKey, before: int) -> int:
        """Drop ``key``'s waiting checkpoints older than its ``before``-th step (their windows can no
        longer be rebuilt); returns how many. Its next judged checkpoint covers their steps."""
        r = self._pending.get(key)
        if r is None or r.waiting[0] >= before:
            return 0
        kept = [t for t in r.waiting if t >= before]
        dropped = len(r.waiting) - len(kept)
        self.shed_total += dropped
        r.waiting = kept
        if not kept:
            del self._pending[key]
        return dropped

    def newest_only(self, key: RankKey, now: float, steps_total: int) -> None:
        """Shed ``key``'s waiting checkpoints but its newest (queue one at its ``steps_total``-th step if
        none waits): what a judgement that must happen now, budget or not, should cover."""
        r = self._pending.get(key)
        if r is None:
            self.finish(key, now, steps_total)
        else:
            self.shed(key, r.waiting[-1])

    def unjudged(self, key: RankKey, steps_total: int) -> int:
        """How many of ``key``'s steps (it has ``steps_total``) came after its last judged checkpoint."""
        r = self._ranks.get(key)
        return steps_total - r.judged if r is not None else steps_total

    def shed_stale(self, key: RankKey, now: float, max_seconds: float) -> int:
        """If ``key``'s oldest waiting checkpoint has waited more than ``max_seconds``, shed all but its
        newest (the server is behind: judging each would only put it further behind); returns how many."""
        r = self._pending.get(key)
        if r is None or len(r.waiting) < 2 or now - r.since <= max_seconds:
            return 0
        return self.shed(key, r.waiting[-1])

    def oldest(self) -> RankKey | None:
        """The rank that has waited longest, or None."""
        return next(iter(self._pending), None)

    def keys(self, job: str | None = None) -> list[RankKey]:
        """Ranks with waiting checkpoints, oldest first (of one job if given)."""
        return [k for k in self._pending if job is None or k[0] == job]

    def drop_job(self, job: str) -> None:
        for key in [k for k in self._ranks if k[0] == job]:
            del self._ranks[key]
            self._pending.pop(key, None)

    def oldest_since(self) -> float | None:
        """When the oldest waiting checkpoint arrived (wall time), or None if nothing waits."""
        r = next(iter(self._pending.values()), None)
        return r.since if r is not None else None

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
