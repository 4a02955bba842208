"""The rules engine: runs rules over windows and owns alert state.

An alert is keyed by (job, rule, rank, stream) (stream: ``attach(stream=...)``, None for a job's
unnamed stream, so a job without named streams keeps the identities it always had). Its lifecycle follows Prometheus'
alerting rules: a finding makes it *pending*; findings over ``for_steps``
steps in a row make it *firing*; ``resolve_after_steps`` steps in a row
without a finding (the cool-down) make it *resolved*, so a noisy signal does
not flap. A pending alert whose condition clears is dropped, never notified.
Job-scoped rules count engine ticks instead of steps. When an alert fires,
``healthd.engine.incidents`` places it in an incident (``caused_by``,
``incident``); a cause stays firing while a consequence it caused fires.

Listeners (Alertmanager push, persistence) hear every pending->firing and
firing->resolved transition. Rank-scoped rules judge checkpoints
(``healthd.engine.scheduler``: steps chosen by their step numbers, each judged
on the window as of it, however late), so a rank's alerts are a function of its
series alone, up to the scheduler's stated limit (shed checkpoints under
sustained overload); job-scoped rules run on ``tick`` and count ticks.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from healthd.engine.incidents import GRAPH, IncidentGraph
from healthd.rules.base import EvidenceValue, Finding, JobRule, RankRule, Rule, is_job_rule, is_rank_rule
from healthd.state.windows import JobWindow, RankWindow
from healthd.wire.schema import MAX_ALERTS_IN_ANSWER, AlertOut, AlertState, FiringAlert, Severity

log = logging.getLogger(__name__)

_W = TypeVar("_W", RankWindow, JobWindow)


@dataclass
class Alert:
    """Mutable alert record, owned by the engine."""

    id: str
    rule: str
    severity: Severity
    state: AlertState
    job: str
    rank: int | None
    layer: str | None
    step: int | None
    last_step: int | None
    summary: str
    evidence: dict[str, EvidenceValue]
    advice: str
    started_at: float
    updated_at: float
    stream: str | None = None  # the rank's named stream; None: the job's unnamed stream (no label)
    fired_at: float | None = None
    resolved_at: float | None = None
    hits: int = 0
    misses: int = 0
    caused_by: str | None = None  # the rule of the firing alert that likely caused this one (incidents)
    # The checkpoint steps (healthd.engine.scheduler) a rank alert fired and resolved at: a function of
    # the series alone, unlike the wall times above.
    fired_step: int | None = None
    resolved_step: int | None = None
    incident: str | None = None  # id of the incident's root alert; set when it fires
    # Restored (``Engine.restore``: from --db after a restart) and not yet found again by this engine's own
    # windows: a rank rule's silence counts as a miss only once the rank has a window's worth of steps here.
    restored: bool = False


    def out(self) -> AlertOut:
        return AlertOut(
            id=self.id, rule=self.rule, severity=self.severity, state=self.state, job=self.job, rank=self.rank,
            stream=self.stream, layer=self.layer, step=self.step, last_step=self.last_step, summary=self.summary,
            evidence=dict(self.evidence), advice=self.advice, started_at=self.started_at,
            updated_at=self.updated_at, resolved_at=self.resolved_at, caused_by=self.caused_by,
            incident=self.incident,
        )

    def firing_out(self) -> FiringAlert:
        return FiringAlert(id=self.id, rule=self.rule, severity=self.severity, job=self.job, rank=self.rank,
                           stream=self.stream, layer=self.layer, step=self.step, summary=self.summary,
                           evidence=dict(self.evidence))


class AlertListener(Protocol):
    def on_transition(self, alert: Alert, previous: AlertState) -> None: ...


AlertKey = tuple[str, int | None, str | None]  # (rule, rank, stream) within a job


@dataclass
class _JobAlerts:
    active: dict[AlertKey, Alert] = field(default_factory=dict)
    history: deque[Alert] = field(default_factory=deque)


_DONE = object()


class Engine:
    """Evaluates rules and keeps alert state per job (jobs are independent)."""

    def __init__(
        self,
        rules: Sequence[Rule[Any, Any]],
        *,
        history_per_job: int = 1000,
        listeners: Iterable[AlertListener] = (),
        clock: Callable[[], float] = time.time,
        incidents: IncidentGraph = GRAPH,
    ) -> None:
        # Dispatch by scope, which each rule derives from the window type it declares (Rule[W, C]).
        self.rank_rules: list[RankRule] = [r for r in rules if is_rank_rule(r)]
        self._gated_fields = sorted({f for r in self.rank_rules for f in r.hints.reads})
        self.job_rules: list[JobRule] = [r for r in rules if is_job_rule(r)]
        self.history_per_job = history_per_job
        self.listeners = list(listeners)
        self.clock = clock
        self.incidents = incidents
        self._jobs: dict[str, _JobAlerts] = {}
        self.evaluation_seconds_sum = 0.0
        self.evaluation_count = 0
        self.rule_errors_total = 0
        self.transitions_total: dict[str, int] = {s.value: 0 for s in AlertState}
        # Alerts firing now, all jobs: kept by _notify and restore, so that ingest's answer asks
        # ``firing_for`` only while something fires (the common answer stays a cached constant).
        self.firing_count = 0

    # ------------------------------------------------------------- evaluation
    def on_step(self, window: RankWindow) -> None:
        """Run the rank-scoped rules on a rank's window after it reported ``window.new_steps`` steps.

        One evaluation may cover several new steps (a request carries a rank's queue). For
        ``resolve_after_steps`` an evaluation without a finding counts the steps it covers. For
        ``for_steps`` a finding counts them too, except the first of a run, which counts one: a
        condition is known to have held over the interval only when the previous evaluation saw it.
        """
        t0 = time.perf_counter()
        now = self.clock()
        weight = max(1, window.new_steps)
        at_step = window.latest.step if window.latest is not None else None
        book = self._jobs.get(window.job)
        new = window.new if self._gated_fields else []
        arrived = {f for f in self._gated_fields for s in new if getattr(s, f) not in _ABSENT}
        for rule in self.rank_rules:
            key = (rule.name, window.rank, window.stream)
            reads = rule.hints.reads
            if reads and arrived.isdisjoint(reads) and (book is None or key not in book.active):
                continue  # none of what it reads arrived: its answer stands (Hints.reads)
            finding = _first(self._evaluate(rule, window))
            if finding is None and (book is None or key not in book.active):
                continue  # the common case: nothing seen, nothing to resolve
            # A restored alert's rule must see a full window before its silence may resolve it: else a
            # restarted healthd resolves (and soon fires again) every windowed alert it restored.
            judged = finding is not None or len(window.steps) >= rule.judging_steps
            self._update(window.job, rule, [(window.rank, finding)] if finding else [], now, scope_keys=[key],
                         weight=weight, at_step=at_step, stream=window.stream, judged=judged)
            book = self._jobs.get(window.job)
        self.evaluation_seconds_sum += time.perf_counter() - t0
        self.evaluation_count += 1

    def on_tick(self, window: JobWindow) -> None:
        """Run the job-scoped rules on a job's window (called periodically)."""
        t0 = time.perf_counter()
        for rule in self.job_rules:
            findings = _all(self._evaluate(rule, window))
            book = self._jobs.get(window.job)
            keys = [k for k in (book.active if book else {}) if k[0] == rule.name and k[2] == window.stream]
            self._update(window.job, rule, [(f.rank, f) for f in findings], window.now, scope_keys=keys,
                         stream=window.stream)
        self.evaluation_seconds_sum += time.perf_counter() - t0
        self.evaluation_count += 1

    def summarize_slices(self, rule: JobRule, window: JobWindow, ranks_per_slice: int) -> Iterator[None]:
        """``window.summarize_slices`` for a job rule about to run, its time counted as the rule's."""
        slices = window.summarize_slices(rule, ranks_per_slice)
        done = False
        while not done:  # a pause after every slice, the last one too: the rule itself comes next
            t0 = time.perf_counter()
            done = next(slices, _DONE) is _DONE
            self.evaluation_seconds_sum += time.perf_counter() - t0
            yield

    def on_tick_rule(self, rule: JobRule, window: JobWindow) -> None:
        """Run one job-scoped rule (of ``job_rules``) on a job's window: ``on_tick`` a rule at a time,
        for a caller that lets other work run in between (the server's ticker serves ingest there).
        As in ``on_tick``, the window counts as one evaluation, once its last rule has run."""
        t0 = time.perf_counter()
        findings = _all(self._evaluate(rule, window))
        book = self._jobs.get(window.job)
        keys = [k for k in (book.active if book else {}) if k[0] == rule.name and k[2] == window.stream]
        self._update(window.job, rule, [(f.rank, f) for f in findings], window.now, scope_keys=keys,
                     stream=window.stream)
        self.evaluation_seconds_sum += time.perf_counter() - t0
        if rule is self.job_rules[-1]:
            self.evaluation_count += 1

    def _evaluate(self, rule: Rule[_W, Any], window: _W) -> Finding | Sequence[Finding] | None:
        try:
            return rule.evaluate(window)
        except Exception:  # a buggy rule must not take ingest down
            self.rule_errors_total += 1
            log.exception("rule %s failed on job %s", rule.name, window.job)
            return None

    def _update(self, job: str, rule: Rule[Any, Any], findings: list[tuple[int | None, Finding]], now: float,
                scope_keys: list[AlertKey], weight: int = 1, at_step: int | None = None,
                stream: str | None = None, judged: bool = True) -> None:
        book = self._jobs.setdefault(job, _JobAlerts())
        cfg = rule.config
        seen: set[AlertKey] = set()
        for rank, f in findings:
            rank = f.rank if f.rank is not None else rank
            key = (rule.name, rank, stream)
            seen.add(key)
            severity = f.severity or cfg.severity or rule.severity
            alert = book.active.get(key)
            if alert is None:
                alert = Alert(
                    id=uuid.uuid4().hex[:16], rule=rule.name, severity=severity, state=AlertState.PENDING,
                    job=job, rank=rank, layer=f.layer, step=f.step, last_step=f.step, summary=f.summary,
                    evidence=dict(f.evidence), advice=rule.advice, started_at=now, updated_at=now, stream=stream,
                )
                if stream is not None:  # the summary says which model of the job it is about
                    alert.summary = f"[stream {stream}] {f.summary}"
                book.active[key] = alert
            else:
                escalated = severity.level > alert.severity.level
                if escalated:
                    alert.severity = severity  # escalate only: the label Alertmanager routes on stays stable
                if alert.state is AlertState.PENDING or escalated:
                    # Once firing, the evidence is what made it fire (the on-call wants the onset, not
                    # step 10,000 of the same NaN); only an escalation brings new evidence.
                    alert.summary = f.summary if stream is None else f"[stream {stream}] {f.summary}"
                    alert.evidence = dict(f.evidence)
                    alert.layer = f.layer or alert.layer
                alert.last_step = f.step if f.step is not None else alert.last_step
                alert.updated_at = now
            alert.hits += weight if alert.hits else 1
            alert.misses = 0
            alert.restored = False
            if alert.state is AlertState.PENDING and alert.hits >= cfg.for_steps:
                alert.state = AlertState.FIRING
                alert.fired_at = now
                alert.fired_step = at_step
                self.incidents.on_firing(alert, book.active.values())
                self._notify(alert, AlertState.PENDING)
        for key in scope_keys:
            if key in seen:
                continue
            alert = book.active.get(key)
            if alert is None:
                continue
            if alert.state is AlertState.PENDING:
                del book.active[key]
                continue
            if alert.restored and not judged:
                continue  # its rule cannot judge yet on this engine's data: no evidence either way
            alert.misses += weight
            if alert.misses >= cfg.resolve_after_steps and not self.incidents.holds_open(
                    alert, book.active.values()):  # a cause waits for the symptoms it caused
                alert.state = AlertState.RESOLVED
                alert.resolved_at = alert.updated_at = now
                alert.resolved_step = at_step
                del book.active[key]
                book.history.append(alert)
                while len(book.history) > self.history_per_job:
                    book.history.popleft()
                self._notify(alert, AlertState.FIRING)

    def _notify(self, alert: Alert, previous: AlertState) -> None:
        self.transitions_total[alert.state.value] += 1
        if alert.state is AlertState.FIRING:
            self.firing_count += 1
        elif previous is AlertState.FIRING:
            self.firing_count -= 1
        for listener in self.listeners:
            try:
                listener.on_transition(alert, previous)
            except Exception:
                log.exception("alert listener %r failed", listener)

    # ------------------------------------------------------------- reads
    def alerts(self, job: str | None = None, *, include_resolved: bool = True,
               include_pending: bool = True) -> list[Alert]:
        books = [self._jobs[job]] if job is not None and job in self._jobs else (
            [] if job is not None else list(self._jobs.values()))
        out: list[Alert] = []
        for book in books:
            out.extend(a for a in book.active.values() if include_pending or a.state is AlertState.FIRING)
            if include_resolved:
                out.extend(book.history)
        out.sort(key=lambda a: a.started_at)
        return out

    def firing(self) -> list[Alert]:
        return [a for book in self._jobs.values() for a in book.active.values() if a.state is AlertState.FIRING]

    def firing_for(self, ranks: Mapping[str, Collection[int]]) -> list[FiringAlert]:
        """The firing alerts to tell the jobs in ``ranks`` (job -> the ranks that reported), for the
        report push's answer (``IngestResult.alerts``): every firing alert of those jobs, one per
        (job, rule, stream): a reporting rank's when there is one, else the first started; most severe first,
        then oldest; at most ``MAX_ALERTS_IN_ANSWER``. All ranks' alerts, not only the reporting
        one's: the ranks of a distributed job must stop together, or the others hang in a collective.
        """
        chosen: dict[tuple[str, str, str | None], Alert] = {}
        for job, reporting in ranks.items():
            book = self._jobs.get(job)
            if book is None:
                continue
            for alert in book.active.values():
                if alert.state is not AlertState.FIRING:
                    continue
                key = (job, alert.rule, alert.stream)
                held = chosen.get(key)
                if held is None or (held.rank not in reporting and (
                        alert.rank in reporting or alert.started_at < held.started_at)):
                    chosen[key] = alert
        best = sorted(chosen.values(), key=lambda a: (-a.severity.level, a.started_at))
        return [a.firing_out() for a in best[:MAX_ALERTS_IN_ANSWER]]

    def restore(self, alerts: Iterable[Alert]) -> None:
        """Load alert state (e.g. from persistence) without notifying. A restored rank alert resolves
        only once its rule has had a full window of the rank's new steps to judge (``Rule.judging_steps``)."""
        for a in alerts:
            book = self._jobs.setdefault(a.job, _JobAlerts())
            if a.state is AlertState.RESOLVED:
                book.history.append(a)
            else:
                a.restored = True
                book.active[(a.rule, a.rank, a.stream)] = a
                self.firing_count += a.state is AlertState.FIRING

    def forget(self, job: str) -> None:
        """Drop a job that went silent past its TTL. Its firing alerts are resolved first, so
        listeners hear it: Alertmanager gets their endsAt instead of re-sends forever."""
        book = self._jobs.pop(job, None)
        if book is None:
            return
        now = self.clock()
        for alert in book.active.values():
            if alert.state is not AlertState.FIRING:
                continue
            alert.state = AlertState.RESOLVED
            alert.resolved_at = alert.updated_at = now
            alert.evidence = {**alert.evidence, "resolved_because": "job expired (silent past store.job_ttl_seconds)"}
            self._notify(alert, AlertState.FIRING)

    def hand_over(self, job: str) -> list[Alert]:
        """Drop a job that moved to another shard, quietly: no listener hears it. Unlike ``forget``, its
        firing alerts are not resolved in Alertmanager: the shard that has the job now judges them, and
        pushes to the same Alertmanager, so a resolve from here would close an alert it still has firing
        (they lapse at the endsAt last sent, unless that shard re-sends them). Returns the alerts that were
        firing, marked resolved here (for the alert database, so a restart does not restore them)."""
        book = self._jobs.pop(job, None)
        if book is None:
            return []
        now = self.clock()
        dropped = []
        for alert in book.active.values():
            if alert.state is not AlertState.FIRING:
                continue
            self.firing_count -= 1
            alert.state = AlertState.RESOLVED
            alert.resolved_at = alert.updated_at = now
            alert.evidence = {**alert.evidence, "resolved_because": "job moved to another shard (cluster.route_url)"}
            dropped.append(alert)
        return dropped


# A sampled field that carries no data: None, or an empty dict or list (``training=False`` is data).
_ABSENT: tuple[object, ...] = (None, {}, [])


def _all(result: Finding | Sequence[Finding] | None) -> list[Finding]:
    """A rule's answer as a list (job-scoped rules may return one finding per rank)."""
    if result is None:
        return []
    if isinstance(result, Finding):
        return [result]
    return [f for f in result if isinstance(f, Finding)]


def _first(result: Finding | Sequence[Finding] | None) -> Finding | None:
    found = _all(result)
    return found[0] if found else None
