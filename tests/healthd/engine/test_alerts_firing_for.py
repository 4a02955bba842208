"""What the engine tells a job on the report push's answer: ``firing_for`` and ``firing_count``."""

from __future__ import annotations

from typing import ClassVar

from healthd.engine.alerts import Engine
from healthd.rules.base import Finding, Rule, RuleConfig
from healthd.state.windows import JobMeta, RankWindow
from healthd.wire.schema import MAX_ALERTS_IN_ANSWER
from tests.healthd.factories import steps


class LossAbove(Rule[RankWindow, RuleConfig]):
    """Test rule: finds while the last loss is above 1."""

    name: ClassVar[str] = "LossAbove"
    Config = RuleConfig

    def evaluate(self, w: RankWindow) -> Finding | None:
        s = w.latest
        if s is None or s.loss is None or s.loss <= 1:
            return None
        return Finding(summary=f"loss {s.loss} on rank {w.rank}", evidence={"loss": s.loss}, step=s.step, rank=w.rank)


def _report(engine: Engine, loss: float, rank: int = 0, job: str = "j") -> None:
    hist = steps(1, loss=[loss])
    engine.on_step(RankWindow(job=job, rank=rank, meta=JobMeta(None), steps=hist, initial_steps=hist))


def test_one_alert_per_rule_the_reporting_ranks_first_and_nothing_once_resolved() -> None:
    eng = Engine([LossAbove(RuleConfig(for_steps=1, resolve_after_steps=1))])
    assert eng.firing_count == 0 and eng.firing_for({"j": {0}}) == []
    for rank in (2, 0, 1):
        _report(eng, 5.0, rank)
    assert eng.firing_count == 3
    [first] = eng.firing_for({"j": {5}})  # a rank with no alert of its own hears the first one started
    assert (first.rule, first.rank, first.summary, first.evidence) == ("LossAbove", 2, "loss 5.0 on rank 2",
                                                                       {"loss": 5.0})
    assert [a.rank for a in eng.firing_for({"j": {1}})] == [1]
    assert eng.firing_for({"other": {0}}) == []
    for rank in (2, 0, 1):
        _report(eng, 0.5, rank)
    assert eng.firing_count == 0 and eng.firing_for({"j": {0, 1, 2}}) == []


def test_the_answer_is_bounded_and_forget_keeps_the_count() -> None:
    eng = Engine([LossAbove(RuleConfig(for_steps=1))])
    for job in range(MAX_ALERTS_IN_ANSWER + 5):
        _report(eng, 5.0, job=f"job{job}")
    everyone = {f"job{job}": {0} for job in range(MAX_ALERTS_IN_ANSWER + 5)}
    assert len(eng.firing_for(everyone)) == MAX_ALERTS_IN_ANSWER
    eng.forget("job0")
    assert eng.firing_count == MAX_ALERTS_IN_ANSWER + 4 == len(eng.firing())
