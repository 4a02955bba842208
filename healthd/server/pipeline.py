"""One report batch's way through the server: decode -> admit -> store -> schedule -> evaluate.

``Healthd`` holds one instance's state (store, engine, evaluation queue, counters) and runs that
path for a request body (``ingest``), in this order and through each layer once:
``healthd.wire.parse`` decodes, ``healthd.server.limits`` admits against the caps,
``healthd.state.store`` keeps, ``healthd.engine.scheduler`` queues the rank for its rules within the
CPU budget, ``healthd.engine.alerts`` evaluates and keeps alert state. Time-driven work (ticks,
sweeps, expiry) is driven from ``healthd.server.lifecycle``; HTTP from ``healthd.server.app``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from healthd.engine.alerts import AlertListener, Engine
from healthd.engine.persistence import AlertDb
from healthd.engine.scheduler import EvaluationQueue, RankKey
from healthd.exposition.collector import Counters, HealthCollector
from healthd.rules import ALL_RULES, build_rules
from healthd.rules.base import JobRule, Rule
from healthd.rules.non_finite_values import nonfinite_parts
from healthd.server.limits import admit
from healthd.settings import Settings
from healthd.state.store import Store
from healthd.wire.parse import parse_batch
from healthd.wire.records import CLEAN, NameCheck, StepRecord
from healthd.wire.schema import JOB_HEADER, FieldError, HeartbeatReport, IngestResult, Rejection


def _job_mismatch(reports: Sequence[Any], indices: list[int] | None, job: str) -> Rejection | None:
    """The refusal of a batch whose reports do not all belong to ``job`` (its ``X-Healthd-Job``)."""
    for pos, report in enumerate(reports):
        if report.job != job:
            index = indices[pos] if indices is not None else pos
            return Rejection(index=index, errors=[FieldError(
                loc=["reports", index, "job"], type="job_mismatch",
                msg=f"report job {report.job!r} does not match the {JOB_HEADER} header {job!r}: a batch "
                    "holds one job's reports, and the header names that job (a proxy routes on it)")])
    return None


@dataclass
class Healthd:
    """Everything one healthd instance holds; reachable as ``app.state.healthd``."""

    settings: Settings
    store: Store
    engine: Engine
    counters: Counters
    registry: CollectorRegistry  # holds ``collector``: generate_latest(registry) is the whole exposition
    collector: HealthCollector
    clock: Callable[[], float]
    queue: EvaluationQueue  # ranks waiting for their rules (healthd.engine.scheduler)
    alert_db: AlertDb | None = None  # persistence.sqlite_path
    names: NameCheck = field(default_factory=NameCheck)  # job and layer names known valid (ingest)
    # IngestResult(accepted=n) for n <= limits.max_reports_per_request
    _all_accepted: dict[int, IngestResult] = field(default_factory=dict)

    TICK_RANKS_PER_SLICE = 256  # ~1-2 ms of per-rank work between the ticker's pauses

    def ingest(self, body: bytes, routed_job: str | None = None) -> tuple[int, IngestResult]:
        """Validate and apply a report batch; returns (HTTP status, result).

        ``routed_job``: the request's ``X-Healthd-Job`` header (None when absent: an older client). A proxy
        routed the request by it, so a batch whose reports name another job would land on a shard
        that does not own that job: it is refused whole (400, nothing applied) instead.
        """
        parsed = parse_batch(body, self.settings.limits.max_reports_per_request, self.names)
        if parsed.body_error is None and routed_job is not None:
            parsed.body_error = _job_mismatch(parsed.reports, parsed.indices, routed_job)
        if parsed.body_error is not None:
            err = parsed.body_error.errors[0]
            status = {"json_invalid": 400, "job_mismatch": 400, "too_many_reports": 413}.get(err.type, 422)
            Counters.inc(self.counters.rejected, err.type)
            return status, IngestResult(accepted=0, rejected=[parsed.body_error])
        now = self.clock()
        limits = self.settings.limits
        capped: list[Rejection] = []
        refused: list[Rejection] = []  # admitted by the caps, refused for another reason (counted as it)
        accepted = 0
        # Step reports are applied in runs of one rank's consecutive steps (a request carries a rank's
        # queue). After a run, its checkpoints (healthd.engine.scheduler: chosen by step numbers alone)
        # are queued and judged, each on the window as of it, at once when the budget allows (always
        # after a NaN/Inf); ranks left waiting are judged later (evaluate_due), on the same windows.
        # A report joins the run only when the caps would judge it the same with the run applied: same
        # job and rank, and no layer name the job does not know yet. Such a report is admitted as it is
        # (as the run's first was); any other ends the run, which is applied before it is admitted.
        run: list[StepRecord] = []
        key: RankKey = ("", -1, None)
        known: set[str] | frozenset[str] = _NO_NAMES
        for pos, report in enumerate(parsed.reports):
            if not (run and isinstance(report, StepRecord) and report.rank == key[1] and report.job == key[0]
                    and report.stream == key[2] and report.layers.keys() <= known
                    and report.activations.keys() <= known):
                if run:
                    self._apply_run(run, key, now)
                    run = []
                index = parsed.indices[pos] if parsed.indices is not None else pos
                admission = admit(self.store, limits, report, index, now)
                if admission is not None:  # past a cap: refused, or trimmed of new layer names
                    if admission.cap is not None and admission.error is not None:
                        Counters.inc(self.counters.capped, admission.cap)
                        capped.append(Rejection(index=index, errors=[admission.error]))
                    elif admission.error is not None:  # not a cap: a stream another monitor holds
                        Counters.inc(self.counters.rejected, admission.error.type)
                        refused.append(Rejection(index=index, errors=[admission.error]))
                    report = admission.report
                    if report is None:
                        continue
                if not isinstance(report, StepRecord):
                    accepted += 1
                    self.store.apply(report, now)
                    Counters.inc(self.counters.received, report.kind)
                    if isinstance(report, HeartbeatReport) and report.closing:  # its last steps: judged now
                        self._finish((report.job, report.rank, report.stream), now)
                    continue
                key = (report.job, report.rank, report.stream)
                job = self.store.state(report.job, report.stream)
                known = job.layer_names if job is not None else _NO_NAMES
            accepted += 1
            run.append(report)
        if run:
            self._apply_run(run, key, now)
        self.evaluate_due()
        if parsed.rejected:
            Counters.inc(self.counters.rejected, "invalid", len(parsed.rejected))
        if capped:
            Counters.inc(self.counters.rejected, "cardinality_cap", len(parsed.reports) - accepted - len(refused))
        # Tell the job (IngestResult.alerts): looked up only while some alert fires anywhere, so the
        # common answer below stays one cached object per count.
        alerts = self.engine.firing_for(_ranks_of(parsed.reports)) if self.engine.firing_count else []
        if parsed.rejected or capped or refused:
            rejected = sorted([*parsed.rejected, *capped, *refused], key=lambda r: r.index)
            return 422, IngestResult(accepted=accepted, rejected=rejected, alerts=alerts)
        if alerts:
            return 200, IngestResult(accepted=accepted, alerts=alerts)
        result = self._all_accepted.get(accepted)
        if result is None:  # frozen, so one per count serves every request
            result = self._all_accepted[accepted] = IngestResult(accepted=accepted)
        return 200, result

    def _apply_run(self, run: list[StepRecord], key: RankKey, now: float) -> None:
        """Apply one rank's consecutive steps, queue their checkpoints, and judge them now if a NaN/Inf
        is among them or the budget allows.

        A waiting checkpoint's window can be rebuilt ``lag`` (half of ``store.detail_steps``) steps back,
        so a run is applied in pieces of at most that many steps, and older checkpoints are shed. So that
        no step goes unseen even then, a rank whose steps since its last judged checkpoint would no longer
        fit the kept window is judged at its newest checkpoint, budget or not: at most one evaluation per
        ``lag`` steps of a rank past the budget (``healthd.engine.scheduler``)."""
        Counters.inc(self.counters.received, "step", len(run))
        every = self.settings.engine.max_steps_per_evaluation
        dense = self.settings.engine.dense_checkpoint_steps
        lag = max(1, self.store.settings.detail_steps // 2)
        for start in range(0, len(run), lag):
            for rank, applied in self.store.apply_steps(run[start:start + lag], now):  # sharded: per group
                job = self.store.state(key[0], key[2])
                assert job is not None  # apply_steps made it
                total = job.ranks[rank].steps_total
                rank_key = (key[0], rank, key[2])
                urgent = self.queue.observe(rank_key, now, total, ((s.step, _urgent(s)) for s in applied), every,
                                            dense)
                self.queue.shed(rank_key, total - lag)
                if urgent or self.queue.has_budget():
                    self.evaluate_rank(rank_key, now)
                elif self.queue.unjudged(rank_key, total) >= lag:  # the next piece would push its oldest out
                    self.queue.newest_only(rank_key, now, total)
                    self.evaluate_rank(rank_key)

    def _finish(self, key: RankKey, now: float) -> None:
        """Judge a rank up to its last step (its monitor closed, or its job is about to expire)."""
        job = self.store.state(key[0], key[2])
        st = job.ranks.get(key[1]) if job is not None else None
        if st is not None:
            self.queue.finish(key, now, st.steps_total)
            self.evaluate_rank(key)

    def evaluate_rank(self, key: RankKey, now: float | None = None) -> None:
        """Judge one rank's (of one stream) waiting checkpoints, oldest first, each on the window as of it,
        charging the budget (healthd.engine.scheduler) the CPU time it took. Given ``now``, checkpoints that
        waited longer than engine.max_checkpoint_lag_seconds are shed first, but the newest."""
        if now is not None:
            self.queue.shed_stale(key, now, self.settings.engine.max_checkpoint_lag_seconds)
        checkpoints = self.queue.take(key)
        job = self.store.state(key[0], key[2])
        if not checkpoints or job is None or key[1] not in job.ranks:
            return
        t0 = time.thread_time()
        total = job.ranks[key[1]].steps_total
        for at, new_steps in checkpoints:
            self.engine.on_step(self.store.rank_window(key[0], key[1], new_steps=new_steps,
                                                       as_of=at if at < total else None, stream=key[2]))
        self.queue.charge(time.thread_time() - t0)

    def evaluate_due(self) -> None:
        """Evaluate queued ranks, oldest first, while the budget (engine.rank_rules_cpu_share) allows."""
        for _ in self.due_slices():
            pass

    def due_slices(self) -> Iterator[None]:
        """``evaluate_due`` a rank at a time (the server's sweeper serves requests in between)."""
        queue = self.queue
        while len(queue) and queue.has_budget():
            key = queue.oldest()
            assert key is not None
            self.evaluate_rank(key, self.clock())
            yield

    def settle(self, job: str | None = None) -> None:
        """Evaluate every queued rank (of ``job`` if given) now, budget or not: for a graceful shutdown
        (what was accepted is evaluated before the alerts are persisted), tests and tools that then
        read alert state. Reads never call it: a GET answers from the state as it is."""
        for key in self.queue.keys(job):
            self.evaluate_rank(key)

    def tick(self) -> None:
        """Run job-scoped rules and expire silent jobs, all at once (tests, the demo)."""
        for _ in self.tick_slices():
            pass

    def tick_slices(self) -> Iterator[None]:
        """``tick`` in slices: it pauses after expiring jobs, every ``TICK_RANKS_PER_SLICE`` ranks while
        building each job's window and computing a rule's per-rank summaries (``Rule.rank_summary``),
        and after each job-scoped rule. The server's ticker lets the event loop serve requests at each
        pause: a whole tick of a job of thousands of ranks takes tens of milliseconds.

        Rules that run after a pause see the window built before it: the ranks' step and GPU series
        are the store's own (they may have grown), their last-step times and ``now`` are as built.
        """
        rules = self.engine.job_rules
        per_slice = self.TICK_RANKS_PER_SLICE
        # A job about to expire is judged once more over every report it sent, its closed ranks included
        # (a job whose ranks all closed is judged so on every tick: its windows are final), then forgotten.
        for name in self.store.expiring(self.clock()):
            for state in self.store.streams_of(name):
                for rank in list(state.ranks):
                    self._finish((name, rank, state.stream), self.clock())
            self.settle(name)
            if rules:
                for st in self.store.streams_of(name):
                    yield from self._judge(name, rules, per_slice, final=True, stream=st.stream)
        for name in self.store.expire(self.clock()):
            self.queue.drop_job(name)
            self.engine.forget(name)
        if not rules:
            return
        yield
        for job in self.store:  # every stream of every job: rules compare one stream's ranks
            if job.ranks or not job.streams:  # not the empty unnamed stream of a job of named streams only
                yield from self._judge(job.name, rules, per_slice, stream=job.stream)

    def hand_over(self, job: str) -> None:
        """Forget a job that moved to another shard (``healthd.server.handover`` found it newer there), as
        its TTL expiry would but without judging it once more and without paging: its alerts are dropped
        quietly (``Engine.hand_over``: no resolve reaches Alertmanager), its series leave /metrics."""
        self.store.forget(job)
        self.queue.drop_job(job)
        dropped = self.engine.hand_over(job)
        if self.alert_db is not None and dropped:
            self.alert_db.save(dropped)
        self.counters.handed_over += 1

    def _judge(self, job: str, rules: Sequence[JobRule], per_slice: int,
               final: bool = False, stream: str | None = None) -> Iterator[None]:
        """Run the job-scoped rules on one stream's window of a job, pausing as ``tick_slices`` says."""
        window = yield from self.store.job_window_slices(job, self.clock(), per_slice, final=final, stream=stream)
        yield
        for rule in rules:
            if rule.hints.summarized:
                yield from self.engine.summarize_slices(rule, window, per_slice)
            self.engine.on_tick_rule(rule, window)
            yield


def build(settings: Settings, *, rules: Sequence[type[Rule[Any, Any]]] = ALL_RULES,
          listeners: Iterable[AlertListener] = (), clock: Callable[[], float] = time.time,
          alert_db: AlertDb | None = None) -> Healthd:
    """Assemble a healthd instance without the HTTP layer (used by create_app, tests, the demo).
    ``alert_db`` stands in for the database at persistence.sqlite_path (tests: a slow disk)."""
    store = Store(settings.store, settings.exporter.window_seconds)
    listeners = list(listeners)
    if alert_db is None and settings.persistence.sqlite_path:
        alert_db = AlertDb(settings.persistence.sqlite_path, history_per_job=settings.store.alert_history_per_job)
    if alert_db is not None:
        listeners.append(alert_db)
    engine = Engine(build_rules(rules, settings.rules), history_per_job=settings.store.alert_history_per_job,
                    listeners=listeners, clock=clock)
    if alert_db is not None:
        # Restored without notifying: a firing alert stays firing and is not paged again.
        engine.restore(alert_db.load(now=clock(), stale_after_seconds=settings.store.job_ttl_seconds))
    counters = Counters()
    queue = EvaluationQueue(settings.engine.rank_rules_cpu_share, settings.engine.rank_rules_burst_seconds)
    registry = CollectorRegistry(auto_describe=False)
    collector = HealthCollector(store, engine, counters, queue, clock)
    registry.register(collector)
    return Healthd(settings, store, engine, counters, registry, collector, clock, queue, alert_db)


_NO_NAMES: frozenset[str] = frozenset()



def _ranks_of(reports: Iterable[Any]) -> dict[str, set[int]]:
    """Job -> the ranks with a report in the batch (every report kind has a job and a rank)."""
    ranks: dict[str, set[int]] = {}
    for report in reports:
        ranks.setdefault(report.job, set()).add(report.rank)
    return ranks


def _urgent(step: StepRecord) -> bool:
    """A step with a NaN/Inf (as NonFiniteValues judges it): its rank is evaluated at once, whatever the budget."""
    if step.nonfinite is CLEAN and (step.loss is None or math.isfinite(step.loss)) and (
            step.grad_norm is None or math.isfinite(step.grad_norm)):
        return False  # the common case, decided without building nonfinite_parts' tuple
    return any(nonfinite_parts(step))

