"""Incidents: the cause -> consequence graph is checked, and the engine groups a job's alerts by cause."""

from __future__ import annotations

from typing import ClassVar

import pytest

from healthd.engine.alerts import Alert, Engine
from healthd.engine.incidents import CONSEQUENCES, GRAPH, IncidentGraph
from healthd.rules import ALL_RULES
from healthd.rules.base import Finding, Rule, RuleConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import AlertState, Severity
from tests.healthd.factories import steps, window


class _Above(Rule[RankWindow, RuleConfig]):
    """Test rule: fires while the last step's ``attr`` is above 1."""

    attr: ClassVar[str] = "loss"
    Config = RuleConfig

    def evaluate(self, w: RankWindow) -> Finding | None:
        s = w.latest
        v = None if s is None else getattr(s, self.attr)
        if v is None or v <= 1:
            return None
        return Finding(summary=f"{self.attr} {v}", evidence={self.attr: v}, step=s.step if s else None, rank=w.rank)


class Cause(_Above):
    """Test rule: the cause, on the loss."""

    name: ClassVar[str] = "Cause"


class Symptom(_Above):
    """Test rule: the consequence, on the gradient norm."""

    name: ClassVar[str] = "Symptom"
    attr: ClassVar[str] = "grad_norm"


GRAPH_2 = IncidentGraph({"Cause": ("Symptom",), "Symptom": ()}, [Cause, Symptom])
COOL_DOWN = RuleConfig(resolve_after_steps=2)


def _engine() -> Engine:
    return Engine([Cause(COOL_DOWN), Symptom(COOL_DOWN)], incidents=GRAPH_2)


def _feed(eng: Engine, loss: list[float], grad_norm: list[float]) -> None:
    hist = steps(len(loss), loss=loss, grad_norm=grad_norm)
    for i in range(len(hist)):
        eng.on_step(window(hist[: i + 1]))


def _by_rule(eng: Engine) -> dict[str, Alert]:
    return {a.rule: a for a in eng.alerts("j", include_resolved=False)}


def test_every_rule_has_a_place_and_the_graph_is_acyclic() -> None:
    assert set(CONSEQUENCES) == {r.name for r in ALL_RULES}
    assert set(GRAPH.causes("LossDiverging")) >= {"LearningRateTooHigh", "NonFiniteValues"}
    assert GRAPH.equal_labels("LearningRateTooHigh", "LossDiverging") == ("job", "rank", "stream")
    assert GRAPH.equal_labels("RankStalled", "StragglerRank") == ("job", "stream")
    assert GRAPH.equal_labels("GPUMemoryLeak", "GPUMemoryNearLimit") == ("job", "rank")  # the process's GPU
    assert GRAPH.equal_labels("GPUHardwareErrors", "RankStalled") == ("job",)


@pytest.mark.parametrize(("graph", "message"), [
    ({"Cause": ("Symptom",)}, "no entry"),
    ({"Cause": ("Nope",), "Symptom": ()}, "not in the rule catalog"),
    ({"Cause": ("Cause",), "Symptom": ()}, "itself"),
    ({"Cause": ("Symptom",), "Symptom": ("Cause",)}, "cycle"),
])
def test_a_bad_graph_is_refused(graph: dict[str, tuple[str, ...]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IncidentGraph(graph, [Cause, Symptom])


def test_a_cross_stream_cause_must_be_a_rule() -> None:
    with pytest.raises(ValueError, match="cross-stream cause"):
        IncidentGraph({"Cause": ("Symptom",), "Symptom": ()}, [Cause, Symptom], cross_stream=("Nope",))


def test_consequence_firing_while_its_cause_fires_joins_the_cause_incident() -> None:
    eng = _engine()
    _feed(eng, loss=[2, 2, 2], grad_norm=[0, 0, 2])
    alerts = _by_rule(eng)
    cause, symptom = alerts["Cause"], alerts["Symptom"]
    assert cause.caused_by is None and cause.incident == cause.id
    assert symptom.caused_by == "Cause" and symptom.incident == cause.id
    out = symptom.out()
    assert (out.caused_by, out.incident) == ("Cause", cause.id)


def test_a_cause_firing_after_its_consequence_adopts_it() -> None:
    eng = _engine()
    _feed(eng, loss=[0, 2], grad_norm=[2, 2])
    alerts = _by_rule(eng)
    assert alerts["Symptom"].caused_by == "Cause" and alerts["Symptom"].incident == alerts["Cause"].id


def test_the_cause_stays_firing_until_its_consequences_resolve() -> None:
    eng = _engine()
    # The cause's condition clears at step 2 (cool-down 2 steps) but its symptom fires until step 5.
    _feed(eng, loss=[2, 2, 0, 0, 0, 0], grad_norm=[0, 2, 2, 2, 2, 2])
    assert _by_rule(eng)["Cause"].state is AlertState.FIRING
    _feed(eng, loss=[2, 2, 0, 0, 0, 0, 0, 0, 0], grad_norm=[0, 2, 2, 2, 2, 2, 0, 0, 0])
    assert _by_rule(eng) == {}
    resolved = {a.rule: a for a in eng.alerts("j")}
    assert resolved["Symptom"].resolved_at is not None and resolved["Cause"].state is AlertState.RESOLVED


def test_an_unrelated_alert_opens_its_own_incident() -> None:
    eng = _engine()
    _feed(eng, loss=[0, 0], grad_norm=[2, 2])
    (symptom,) = eng.alerts("j")
    assert symptom.caused_by is None and symptom.incident == symptom.id


def _alert(rule: str, rank: int | None, state: AlertState = AlertState.FIRING, stream: str | None = None) -> Alert:
    return Alert(id=f"{rule}-{rank}-{stream}", rule=rule, severity=Severity.WARNING, state=state, job="j",
                 rank=rank, layer=None, step=0, last_step=0, summary="", evidence={}, advice="", started_at=0.0,
                 updated_at=0.0, fired_at=0.0, stream=stream)


def test_rank_rules_link_on_the_same_rank_only() -> None:
    cause, other_rank = _alert("Cause", 0), _alert("Symptom", 1)
    GRAPH_2.on_firing(cause, [cause])
    GRAPH_2.on_firing(other_rank, [cause, other_rank])
    assert other_rank.caused_by is None and other_rank.incident == other_rank.id
    same_rank = _alert("Symptom", 0)
    GRAPH_2.on_firing(same_rank, [cause, other_rank, same_rank])
    assert same_rank.caused_by == "Cause" and same_rank.incident == cause.id


def test_a_cause_takes_its_incidents_worst_severity_so_muting_consequences_never_mutes_a_page() -> None:
    from healthd.engine.alerts import Alert
    from healthd.engine.incidents import GRAPH
    from healthd.wire.schema import AlertState, Severity

    def firing(rule: str, severity: Severity, aid: str) -> Alert:
        return Alert(id=aid, rule=rule, severity=severity, state=AlertState.FIRING, job="j", rank=0, layer=None,
                     step=1, last_step=1, summary="", evidence={}, advice="", started_at=1.0, updated_at=1.0,
                     fired_at=1.0)

    cause = firing("LearningRateTooHigh", Severity.WARNING, "c")
    GRAPH.on_firing(cause, [cause])
    effect = firing("DeadActivations", Severity.CRITICAL, "e")
    GRAPH.on_firing(effect, [cause, effect])
    assert effect.caused_by == "LearningRateTooHigh" and effect.incident == "c"
    assert cause.severity is Severity.CRITICAL  # the page that reaches the pager names the cause
    info = firing("LossPlateau", Severity.INFO, "i")
    GRAPH.on_firing(info, [cause, effect, info])
    assert cause.severity is Severity.CRITICAL  # escalate only


def test_a_cause_on_one_stream_does_not_explain_a_consequence_on_another_stream_of_its_rank() -> None:
    """A GAN: the discriminator's learning rate is too high; the generator's loss diverging on the same
    rank is the generator's own incident (and does not hold the discriminator's cause open)."""
    cause = _alert("LearningRateTooHigh", 0, stream="discriminator")
    GRAPH.on_firing(cause, [cause])
    other = _alert("LossDiverging", 0, stream="generator")
    GRAPH.on_firing(other, [cause, other])
    assert other.caused_by is None and other.incident == other.id
    assert not GRAPH.holds_open(cause, [cause, other])
    own = _alert("LossDiverging", 0, stream="discriminator")
    GRAPH.on_firing(own, [cause, other, own])
    assert own.caused_by == "LearningRateTooHigh" and own.incident == cause.id
    assert GRAPH.holds_open(cause, [cause, other, own])
    unnamed = _alert("LossDiverging", 0)  # the unnamed stream is a stream of its own
    GRAPH.on_firing(unnamed, [cause, other, own, unnamed])
    assert unnamed.caused_by is None


def test_a_cause_on_one_stream_does_not_adopt_another_streams_consequence() -> None:
    effect = _alert("LossDiverging", 0, stream="generator")
    GRAPH.on_firing(effect, [effect])
    cause = _alert("LearningRateTooHigh", 0, stream="discriminator")
    GRAPH.on_firing(cause, [effect, cause])
    assert effect.caused_by is None and effect.incident == effect.id


def test_the_process_gpu_explains_consequences_on_every_stream_of_its_rank() -> None:
    """The GPU is sampled once per process (under its first monitor's stream): a failing GPU stalls
    every stream on it, so the graph lets GPU causes cross streams (still on the same rank when both
    rules are about one rank)."""
    gpu = _alert("GPUHardwareErrors", 0, stream="generator")
    GRAPH.on_firing(gpu, [gpu])
    stalled = _alert("RankStalled", 0, stream="discriminator")
    GRAPH.on_firing(stalled, [gpu, stalled])
    assert stalled.caused_by == "GPUHardwareErrors" and stalled.incident == gpu.id
    assert GRAPH.holds_open(gpu, [gpu, stalled])
    leak = _alert("GPUMemoryLeak", 0, stream="generator")
    GRAPH.on_firing(leak, [leak])
    near_other_rank = _alert("GPUMemoryNearLimit", 1, stream="discriminator")
    GRAPH.on_firing(near_other_rank, [leak, near_other_rank])
    assert near_other_rank.caused_by is None
    near = _alert("GPUMemoryNearLimit", 0, stream="discriminator")
    GRAPH.on_firing(near, [leak, near_other_rank, near])
    assert near.caused_by == "GPUMemoryLeak"


def test_engine_groups_incidents_per_stream() -> None:
    """Through the engine: the cause fires on one stream of rank 0, the symptom on both; only the
    cause's own stream joins its incident."""
    eng = _engine()
    d = steps(3, loss=[2, 2, 2], grad_norm=[0, 2, 2])
    g = steps(3, loss=[0, 0, 0], grad_norm=[0, 2, 2])
    for i in range(3):
        eng.on_step(window(d[: i + 1], stream="discriminator"))
        eng.on_step(window(g[: i + 1], stream="generator"))
    alerts = {(a.rule, a.stream): a for a in eng.alerts("j", include_resolved=False)}
    cause = alerts[("Cause", "discriminator")]
    assert alerts[("Symptom", "discriminator")].incident == cause.id
    gen = alerts[("Symptom", "generator")]
    assert gen.caused_by is None and gen.incident == gen.id


def _firing(rule: str, t: float) -> Alert:
    return Alert(id=rule, rule=rule, severity=Severity.WARNING, state=AlertState.FIRING, job="j", rank=0, layer=None,
                 step=0, last_step=0, summary="", evidence={}, advice="", started_at=t, updated_at=t, fired_at=t)


@pytest.mark.parametrize("cascade", [
    # the fault zoo's error_explodes (seed 1): one exploded step, then the loss and the layers below it
    ["ExplodingGradients", "LossDiverging", "GradientsNotFlowing", "LossPlateau"],
    # ddp_missing_zero_grad: summed gradients make every update oversized; the update ratio follows
    ["MissingZeroGrad", "ExplodingGradients", "LearningRateTooHigh", "LossDiverging", "LossOscillating"],
    # deep_sigmoid_stack: the first layers' weights stop changing (w + dw == w) before the vanishing gradient's
    # median over 50 steps fires; it adopts them
    ["WeightsNotUpdating", "VanishingGradients"],
    # corrupted_shard_alternating: no net progress shows as a plateau before the swings grow past the loss's half
    ["LossPlateau", "LossOscillating"],
])
def test_the_zoo_cascades_are_one_incident_with_one_root(cascade: list[str]) -> None:
    fired: list[Alert] = []
    for t, rule in enumerate(cascade):
        fired.append(_firing(rule, float(t)))
        GRAPH.on_firing(fired[-1], fired)
    roots = [a.rule for a in fired if a.caused_by is None]
    assert len(roots) == 1 and len({a.incident for a in fired}) == 1, [(a.rule, a.caused_by) for a in fired]
