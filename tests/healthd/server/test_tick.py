"""The tick: job-scoped rules and job expiry, run at once (``Healthd.tick``) or in slices by the
server's ticker, which lets the event loop serve requests between them."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from healthd.engine.alerts import Alert
from healthd.rules import ALL_RULES
from healthd.rules.base import Finding, Rule, RuleConfig
from healthd.server.lifecycle import _ticker, silent_jobs
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.state.windows import JobWindow
from healthd.wire.schema import AlertState, HeartbeatReport, Severity
from tests.healthd.factories import step


def _healthd(now: list[float], rules: list[type[Rule]] | None = None, **engine: float) -> Healthd:
    settings = Settings.from_mapping({"engine": engine})
    return build(settings, rules=ALL_RULES if rules is None else rules, clock=lambda: now[0])


def test_tick_fires_job_rules_and_counts_one_evaluation_per_job() -> None:
    now = [1000.0]
    hd = _healthd(now)
    for job in ("a", "b"):
        for rank in (0, 1):
            hd.store.apply(step(1, job=job, rank=rank, loss=1.0), now[0])
            hd.store.apply(HeartbeatReport(job=job, rank=rank, time=now[0]), now[0])
    now[0] += 400.0  # past RankStalled's and TrainingStalled's 300 s
    hd.tick()
    firing = sorted((a.job, a.rule, a.rank) for a in hd.engine.firing())
    assert firing == [(job, rule, rank) for job in ("a", "b")
                      for rule, rank in (("RankStalled", 0), ("RankStalled", 1), ("TrainingStalled", None))]
    assert hd.engine.evaluation_count == 2


def test_tick_slices_pause_after_expiry_each_window_and_each_rule() -> None:
    now = [1000.0]
    hd = _healthd(now)
    for job in ("a", "b", "c"):
        hd.store.apply(step(1, job=job, loss=1.0), now[0])
    rules = hd.engine.job_rules  # a summarized rule pauses once more: after its per-rank summaries
    assert sum(1 for _ in hd.tick_slices()) == 1 + 3 * (1 + len(rules) + sum(r.hints.summarized for r in rules))
    now[0] += hd.settings.store.job_ttl_seconds + 1
    # every job expired: judged one final time each, then forgotten, nothing left to evaluate
    assert sum(1 for _ in hd.tick_slices()) == 1 + 3 * (1 + len(rules) + sum(r.hints.summarized for r in rules))
    assert not hd.store.jobs


def test_ticker_lets_other_tasks_run_between_rules() -> None:
    log: list[str] = []

    class First(Rule[JobWindow, RuleConfig]):
        """Test rule: records that it ran."""

        name: ClassVar[str] = "First"
        Config = RuleConfig

        def evaluate(self, window: JobWindow) -> Finding | None:
            log.append(self.name)
            return None

    class Second(First):
        """Test rule: records that it ran."""

        name: ClassVar[str] = "Second"

    now = [1000.0]
    hd = _healthd(now, rules=[First, Second], tick_seconds=0.01)
    hd.store.apply(step(1, job="a"), now[0])

    async def other() -> None:
        while "Second" not in log:
            log.append("other")
            await asyncio.sleep(0)

    async def main() -> None:
        ticker = asyncio.create_task(_ticker(hd))
        await asyncio.wait_for(other(), timeout=5)
        ticker.cancel()

    asyncio.run(main())
    assert "other" in log[log.index("First") + 1:log.index("Second")]


def test_a_job_of_many_ranks_is_ticked_in_slices_of_ranks_with_the_findings_of_a_whole_tick() -> None:
    """At thousands of ranks, building the job's window and a rule's per-rank work (Rule.rank_summary)
    pause every TICK_RANKS_PER_SLICE ranks; what the rules find is what one unsliced pass finds."""
    from healthd.rules.gradient_norm_mismatch import GradientNormMismatch
    from healthd.rules.straggler_rank import StragglerRank

    now = [1000.0]
    ranks = 600
    sliced, whole = (_healthd(now, rules=[StragglerRank, GradientNormMismatch]) for _ in range(2))
    for hd in (sliced, whole):
        for rank in range(ranks):
            for i in range(20):  # rank 7 is slow, rank 11's local gradient is 50x the others'
                hd.store.apply(step(i, rank=rank, step_seconds=0.5 if rank == 7 else 0.1,
                                    grad_norm_local=50.0 if rank == 11 else 1.0), now[0])
    per = sliced.TICK_RANKS_PER_SLICE
    assert ranks > 2 * per
    pauses = sum(1 for _ in sliced.tick_slices())
    window_pauses = (ranks - 1) // per  # inside the job window; then one after it
    summary_pauses = window_pauses + 1  # after every slice of a rule's summaries; then one after the rule
    assert pauses == 1 + window_pauses + 1 + 2 * (summary_pauses + 1)
    whole.engine.on_tick(whole.store.job_window("j", now[0]))
    found = [(a.rule, a.rank, a.evidence) for a in sliced.engine.alerts("j")]
    assert found == [(a.rule, a.rank, a.evidence) for a in whole.engine.alerts("j")]
    assert {(rule, rank) for rule, rank, _ in found} == {("StragglerRank", 7), ("GradientNormMismatch", 11)}


def test_silent_jobs_are_the_store_s_silent_ones_and_after_a_while_restored_alerts_jobs_that_never_reported() -> None:
    """What the ticker tells the Alertmanager pusher to stop sending (alertmanager.silent_job_seconds, 60 s)."""
    now = [1000.0]
    hd = _healthd(now)
    started = now[0]
    hd.store.apply(step(1, job="moved", loss=1.0), now[0])
    hd.engine.restore([Alert(id="r", rule="NonFiniteValues", severity=Severity.CRITICAL, state=AlertState.FIRING,
                             job="gone", rank=0, layer=None, step=1, last_step=1, summary="", evidence={},
                             advice="", started_at=0.0, updated_at=0.0, fired_at=0.0)])  # from --db
    now[0] += 30.0
    hd.store.apply(step(2, job="here", loss=1.0), now[0])
    assert silent_jobs(hd, started) == []
    now[0] += 31.0  # "moved" silent 61 s, "here" 31 s; 61 s since the start
    assert silent_jobs(hd, started) == ["moved", "gone"]
    hd.store.apply(HeartbeatReport(job="moved", rank=0, time=now[0]), now[0])  # a heartbeat is a report too
    assert silent_jobs(hd, started) == ["gone"]
