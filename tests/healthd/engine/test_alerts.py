"""The engine's alert lifecycle: pending -> firing -> resolved, for_steps, cool-down, listeners."""

from __future__ import annotations

from typing import ClassVar

from healthd.engine.alerts import Alert, Engine
from healthd.rules.base import Finding, Rule, RuleConfig, WindowedConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import AlertState, Severity
from tests.healthd.factories import steps, window


class LossAbove(Rule[RankWindow, RuleConfig]):
    """Test rule: fires while the last loss is above 1."""

    name: ClassVar[str] = "LossAbove"
    Config = RuleConfig
    advice: ClassVar[str] = "lower it"

    def evaluate(self, w: RankWindow) -> Finding | None:
        s = w.latest
        if s is None or s.loss is None or s.loss <= 1:
            return None
        sev = Severity.CRITICAL if s.loss > 10 else None
        return Finding(summary=f"loss {s.loss}", evidence={"loss": s.loss}, step=s.step, rank=w.rank, severity=sev)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, AlertState, AlertState]] = []

    def on_transition(self, alert: Alert, previous: AlertState) -> None:
        self.events.append((alert.rule, previous, alert.state))


def run(engine: Engine, losses: list[float]) -> None:
    hist = steps(len(losses), loss=losses)
    for i in range(len(hist)):
        engine.on_step(window(hist[: i + 1]))


def test_lifecycle_with_for_steps_and_cooldown() -> None:
    rec = Recorder()
    eng = Engine([LossAbove(RuleConfig(for_steps=3, resolve_after_steps=2))], listeners=[rec])
    run(eng, [0.5, 2, 2])
    (a,) = eng.alerts("j")
    assert a.state is AlertState.PENDING and rec.events == []
    run(eng, [0.5, 2, 2, 2])
    (a,) = eng.alerts("j", include_resolved=False)
    assert a.state is AlertState.FIRING and a.step == 1 and a.last_step == 3
    assert rec.events == [("LossAbove", AlertState.PENDING, AlertState.FIRING)]


def test_pending_that_clears_is_dropped_and_noisy_signal_does_not_flap() -> None:
    rec = Recorder()
    eng = Engine([LossAbove(RuleConfig(for_steps=2, resolve_after_steps=3))], listeners=[rec])
    run(eng, [2, 0.5])
    assert eng.alerts("j") == []
    # firing, then one quiet step, then firing again: still the same alert, no resolve.
    run(eng, [2, 2, 0.5, 2, 0.5, 0.5, 2])
    alerts = eng.alerts("j")
    assert len(alerts) == 1 and alerts[0].state is AlertState.FIRING
    run(eng, [2, 2, 0.5, 0.5, 0.5])
    (a,) = eng.alerts("j")
    assert a.state is AlertState.RESOLVED and a.resolved_at is not None
    assert [e[2] for e in rec.events if e[0] == "LossAbove"][-1] is AlertState.RESOLVED


def test_severity_escalates_only_and_jobs_are_independent() -> None:
    eng = Engine([LossAbove()])
    run(eng, [2, 20, 2])
    (a,) = eng.alerts("j")
    assert a.severity is Severity.CRITICAL
    other = steps(1, loss=[5.0])
    eng.on_step(RankWindow(job="other", rank=3, meta=window([]).meta, steps=other))
    assert [x.rank for x in eng.alerts("other")] == [3]
    eng.forget("other")
    assert eng.alerts("other") == [] and len(eng.alerts("j")) == 1


def test_buggy_rule_is_contained() -> None:
    class Broken(LossAbove):
        name: ClassVar[str] = "Broken"

        def evaluate(self, w: RankWindow) -> Finding | None:
            raise RuntimeError("bug")

    eng = Engine([Broken(), LossAbove()])
    run(eng, [2])
    assert eng.rule_errors_total == 1 and [a.rule for a in eng.alerts("j")] == ["LossAbove"]


def test_firing_alert_keeps_the_evidence_that_fired_it_unless_it_escalates() -> None:
    eng = Engine([LossAbove(RuleConfig(for_steps=2))])
    run(eng, [2, 3, 4, 5])
    (a,) = eng.alerts("j")
    assert a.evidence == {"loss": 3} and a.last_step == 3  # fired at the 2nd finding; last_step still moves
    run(eng, [2, 3, 4, 50])
    (a,) = eng.alerts("j")
    assert a.severity is Severity.CRITICAL and a.evidence == {"loss": 50}


def test_forgetting_an_expired_job_resolves_its_firing_alerts_for_the_listeners() -> None:
    rec = Recorder()
    eng = Engine([LossAbove()], listeners=[rec])
    run(eng, [2])
    eng.forget("j")
    assert rec.events[-1] == ("LossAbove", AlertState.FIRING, AlertState.RESOLVED)
    assert eng.alerts("j") == []


def test_handing_a_job_over_drops_its_alerts_quietly() -> None:
    """A job that moved to another shard: no listener hears a resolve (the Alertmanager pusher would
    close the alert the new owner still has firing); the dropped alerts come back marked resolved."""
    rec = Recorder()
    eng = Engine([LossAbove()], listeners=[rec])
    run(eng, [2])
    heard = list(rec.events)
    (dropped,) = eng.hand_over("j")
    assert rec.events == heard
    assert dropped.state is AlertState.RESOLVED and "moved" in str(dropped.evidence["resolved_because"])
    assert eng.alerts("j") == [] and eng.firing_count == 0
    assert eng.hand_over("j") == []


class MeanLossAbove(Rule[RankWindow, WindowedConfig]):
    """Test rule: fires while the mean of the last ``window_steps`` losses is above 1; silent before it has them."""

    name: ClassVar[str] = "MeanLossAbove"
    Config = WindowedConfig
    advice: ClassVar[str] = "lower it"

    def evaluate(self, w: RankWindow) -> Finding | None:
        n = self.config.window_steps
        losses = [s.loss for s in w.steps[-n:] if s.loss is not None]
        if len(losses) < n or sum(losses) / n <= 1:
            return None
        return Finding(summary="mean loss above 1", evidence={}, step=w.steps[-1].step, rank=w.rank)


def _restored(eng: Engine, rule: str) -> None:
    eng.restore([Alert(id="r", rule=rule, severity=Severity.WARNING, state=AlertState.FIRING, job="j", rank=0,
                       layer=None, step=1, last_step=1, summary="s", evidence={}, advice="", started_at=0.0,
                       updated_at=0.0, fired_at=0.0)])


def test_a_restored_alert_is_not_resolved_by_a_rule_that_cannot_judge_yet() -> None:
    """After a restart (--db) the windows are empty: a windowed rule's silence before its window is
    full is no evidence, so the alert holds; found again, it just goes on; silent over a full window,
    it resolves after resolve_after_steps as any alert."""
    cfg = WindowedConfig(window_steps=10, resolve_after_steps=2)
    for losses, state, resolved_at in [
        ([2.0] * 9, AlertState.FIRING, None),  # 9 steps < the window: held although the rule said nothing
        ([2.0] * 14, AlertState.FIRING, None),  # found again once the window is full: confirmed
        ([0.5] * 9, AlertState.FIRING, None),  # the fault ended while this healthd was down: judged at 10...
        ([0.5] * 11, AlertState.RESOLVED, 10),  # ...and resolved after resolve_after_steps more
    ]:
        rec = Recorder()
        eng = Engine([MeanLossAbove(cfg)], listeners=[rec])
        _restored(eng, "MeanLossAbove")
        run(eng, losses)
        (a,) = eng.alerts("j")
        assert a.state is state, losses
        assert a.resolved_step == resolved_at, losses
        assert rec.events == ([("MeanLossAbove", AlertState.FIRING, AlertState.RESOLVED)] if resolved_at else [])


def test_a_restored_single_step_rule_alert_resolves_as_before() -> None:
    rec = Recorder()
    eng = Engine([LossAbove(RuleConfig(resolve_after_steps=2))], listeners=[rec])
    _restored(eng, "LossAbove")
    run(eng, [0.5, 0.5])
    assert [a.state for a in eng.alerts("j")] == [AlertState.RESOLVED]
