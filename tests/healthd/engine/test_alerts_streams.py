"""Two streams of one rank (a GAN's generator and discriminator) keep separate alert state in the engine.

Each (rule, rank, stream) is its own alert: its own pending count, firing, severity, cool-down and
resolution; a step of one stream never advances or clears the other's.
"""

from __future__ import annotations

from typing import ClassVar

from healthd.engine.alerts import Engine
from healthd.rules.base import Finding, Rule, RuleConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import AlertState, Severity
from tests.healthd.factories import steps, window


class LossAbove(Rule[RankWindow, RuleConfig]):
    """Test rule: fires while the last loss is above 1 (critical above 10)."""

    name: ClassVar[str] = "LossAbove"
    Config = RuleConfig

    def evaluate(self, w: RankWindow) -> Finding | None:
        s = w.latest
        if s is None or s.loss is None or s.loss <= 1:
            return None
        sev = Severity.CRITICAL if s.loss > 10 else None
        return Finding(summary=f"loss {s.loss}", evidence={"loss": s.loss}, step=s.step, rank=w.rank, severity=sev)


def _feed(eng: Engine, generator: list[float], discriminator: list[float]) -> None:
    """Alternate the two streams step by step, as a GAN loop reports them."""
    g, d = steps(len(generator), loss=generator), steps(len(discriminator), loss=discriminator)
    for i in range(max(len(g), len(d))):
        if i < len(d):
            eng.on_step(window(d[: i + 1], stream="discriminator"))
        if i < len(g):
            eng.on_step(window(g[: i + 1], stream="generator"))


def _by_stream(eng: Engine, include_resolved: bool = True) -> dict[str | None, object]:
    alerts = eng.alerts("j", include_resolved=include_resolved)
    assert len({a.stream for a in alerts}) == len(alerts)  # one alert per (rule, rank, stream)
    return {a.stream: a for a in alerts}


def test_two_streams_of_one_rank_keep_separate_pending_firing_and_resolution() -> None:
    eng = Engine([LossAbove(RuleConfig(for_steps=3, resolve_after_steps=2))])
    # The discriminator's condition holds for 2 steps only, interleaved with the generator's 3:
    # pending counts are per stream, so only the generator's fires.
    _feed(eng, generator=[2, 2, 2], discriminator=[2, 2, 0.5])
    alerts = _by_stream(eng)
    assert set(alerts) == {"generator"}
    g = eng.alerts("j")[0]
    assert g.state is AlertState.FIRING and g.rank == 0 and g.summary.startswith("[stream generator]")
    # Now the discriminator fires too (critical), and the generator's condition clears: the
    # generator's alert resolves on its own steps while the discriminator's stays firing at its severity.
    _feed(eng, generator=[2, 2, 2, 0.5, 0.5, 0.5], discriminator=[2, 2, 0.5, 20, 20, 20])
    alerts = {a.stream: a for a in eng.alerts("j")}
    assert alerts["generator"].state is AlertState.RESOLVED
    assert alerts["discriminator"].state is AlertState.FIRING
    assert alerts["discriminator"].severity is Severity.CRITICAL
    assert alerts["generator"].severity is not Severity.CRITICAL  # escalation is the discriminator's own
    assert alerts["generator"].id != alerts["discriminator"].id


def test_the_unnamed_stream_and_a_named_one_are_two_alerts() -> None:
    eng = Engine([LossAbove()])
    hist = steps(2, loss=[2, 2])
    for i in range(2):
        eng.on_step(window(hist[: i + 1]))
        eng.on_step(window(hist[: i + 1], stream="generator"))
    streams = sorted((a.stream or "") for a in eng.alerts("j", include_resolved=False))
    assert streams == ["", "generator"]
