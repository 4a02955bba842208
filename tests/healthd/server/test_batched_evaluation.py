"""One request carries a rank's queue: its rules judge the checkpoints among its steps (every
engine.max_steps_per_evaluation step numbers), each on the window as of it, however the steps were batched."""

from __future__ import annotations

import json
from typing import ClassVar

from healthd.rules.base import Finding, Hints, Rule, RuleConfig
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.state.windows import RankWindow
from healthd.wire.schema import AlertState


class Seen(Rule[RankWindow, RuleConfig]):
    """Test rule: records what each evaluation saw; finds while the latest loss is above 1."""

    name: ClassVar[str] = "Seen"
    Config = RuleConfig
    calls: ClassVar[list[tuple[int, list[int]]]] = []

    def evaluate(self, w: RankWindow) -> Finding | None:
        s = w.latest
        assert s is not None
        Seen.calls.append((s.step, [n.step for n in w.new]))
        assert w.column("step")[-1] == s.step  # columns end at the same step as the reports
        if s.loss is not None and s.loss > 1:
            return Finding(summary="high", evidence={}, step=s.step, rank=w.rank)
        return None


def _body(losses: list[float], start: int = 0) -> bytes:
    reports = [{"kind": "step", "job": "j", "rank": 0, "time": 1.0, "step": start + i, "loss": v}
               for i, v in enumerate(losses)]
    return json.dumps({"schema_version": 1, "reports": reports}).encode()


def _healthd(every: int) -> Healthd:
    Seen.calls = []
    return build(Settings.from_mapping({"engine": {"max_steps_per_evaluation": every, "rank_rules_cpu_share": 1.0,
                                                   "dense_checkpoint_steps": 0},
                                        "rules": {"Seen": {"for_steps": 3, "resolve_after_steps": 8}}}),
                 rules=[Seen])


def test_a_long_request_is_judged_at_its_checkpoints_each_on_its_own_window() -> None:
    hd = _healthd(5)
    status, _ = hd.ingest(_body([0.5] * 23))
    assert status == 200
    # Every step up to the last checkpoint is in exactly one judged window's `new`; 21-22 wait for step 25.
    assert Seen.calls == [(0, [0]), (5, [1, 2, 3, 4, 5]), (10, [6, 7, 8, 9, 10]), (15, [11, 12, 13, 14, 15]),
                          (20, [16, 17, 18, 19, 20])]
    Seen.calls = []
    hd.ingest(_body([0.5] * 3, start=23))
    assert Seen.calls == [(25, [21, 22, 23, 24, 25])]


def test_a_condition_inside_one_request_is_seen_and_hits_count_steps() -> None:
    hd = _healthd(5)
    losses = [0.5] * 10 + [5.0] * 10 + [0.5] * 5  # high for steps 10..19 only, all in one request
    hd.ingest(_body(losses))
    alerts = hd.engine.alerts("j")
    assert len(alerts) == 1
    a = alerts[0]
    # Seen at the checkpoint at step 10 (1 step: the first of a run), then 5 more at step 15: firing
    # (for_steps=3); the checkpoint at step 20 is 5 clean steps of the 8 needed to resolve.
    assert a.state is AlertState.FIRING and a.step == 10 and a.last_step == 15 and a.fired_step == 15
    hd.ingest(_body([0.5] * 2, start=25))
    a = hd.engine.alerts("j")[0]
    assert a.state is AlertState.RESOLVED and a.resolved_step == 25  # 10 clean steps at the next checkpoint


def test_with_one_step_per_checkpoint_every_step_is_judged() -> None:
    hd = _healthd(1)
    for i in range(4):
        hd.ingest(_body([2.0], start=i))
    assert [c[0] for c in Seen.calls] == [0, 1, 2, 3]
    a = hd.engine.alerts("j")[0]
    assert a.state is AlertState.FIRING and a.step == 0 and a.fired_step == 2  # hits 1, 2, 3


class SampledInputs(Rule[RankWindow, RuleConfig]):
    """Test rule over a sampled field: finds while the newest sampled input mean is above 1."""

    name: ClassVar[str] = "SampledInputs"
    Config = RuleConfig
    hints: ClassVar[Hints] = Hints(reads=("inputs",))
    calls: ClassVar[list[int]] = []

    def evaluate(self, w: RankWindow) -> Finding | None:
        assert w.latest is not None
        SampledInputs.calls.append(w.latest.step)
        sampled = w.latest_where(lambda s: s.inputs is not None, 1, 10)
        if sampled and sampled[-1].inputs is not None and sampled[-1].inputs.mean > 1:
            return Finding(summary="inputs", evidence={}, step=sampled[-1].step, rank=w.rank)
        return None


def test_a_rule_over_a_sampled_field_runs_when_it_arrives_or_while_its_alert_is_open() -> None:
    SampledInputs.calls = []
    hd = build(Settings.from_mapping({"engine": {"max_steps_per_evaluation": 1, "rank_rules_cpu_share": 1.0},
                                      "rules": {"SampledInputs": {"resolve_after_steps": 3}}}), rules=[SampledInputs])

    def send(step: int, mean: float | None = None) -> None:
        report: dict[str, object] = {"kind": "step", "job": "j", "rank": 0, "time": 1.0, "step": step, "loss": 1.0}
        if mean is not None:
            report["inputs"] = {"mean": mean, "std": 1.0, "abs_max": 3.0}
        hd.ingest(json.dumps({"schema_version": 1, "reports": [report]}).encode())

    send(0, mean=0.0)
    for i in range(1, 5):
        send(i)
    assert SampledInputs.calls == [0]  # steps 1-4 carried no inputs: nothing to re-judge
    send(5, mean=5.0)
    assert hd.engine.alerts("j")[0].state is AlertState.FIRING
    for i in range(6, 9):
        send(i)  # the alert is open: evaluated every step, and still finds (step 5 is within 10)
    assert SampledInputs.calls == [0, 5, 6, 7, 8]
    send(9, mean=0.0)
    for i in range(10, 13):
        send(i)
    assert hd.engine.alerts("j")[0].state is AlertState.RESOLVED
    assert SampledInputs.calls == [0, 5, 6, 7, 8, 9, 10, 11]  # resolved at 11: skipped again at 12


def test_a_request_is_admitted_and_stored_as_its_reports_sent_one_per_request() -> None:
    """Ingest applies a rank's consecutive steps as one run: the caps and the store must come out as if
    each report had come alone, whatever mix of jobs, ranks, new layer names and other kinds."""
    import random

    from tests.healthd.state.test_store import _state

    rng = random.Random(3)
    reports: list[dict[str, object]] = []
    for i in range(400):
        job, rank = rng.choice(["a", "a", "a", "b", "c"]), rng.choice([0, 0, 0, 1, 2])
        if rng.random() < 0.1:
            reports.append({"kind": "heartbeat", "job": job, "rank": rank, "time": 1.0, "step": i})
            continue
        layers = {f"l{rng.randrange(6)}": {"grad_norm": 1.0} for _ in range(rng.choice([0, 1, 2]))}
        reports.append({"kind": "step", "job": job, "rank": rank, "time": 1.0, "step": i, "layers": layers,
                        "loss": float("nan") if rng.random() < 0.05 else rng.uniform(0, 3), "batch_size": 8})
    settings = Settings.from_mapping({"limits": {"max_jobs": 2, "max_ranks_per_job": 2, "max_layers_per_job": 3}})
    together, alone = build(settings), build(settings)
    together.clock = alone.clock = lambda: 5.0
    rejected_alone = []
    for i in range(0, len(reports), 40):  # requests of 40, made of runs of one rank's steps
        chunk = reports[i:i + 40]
        chunk.sort(key=lambda r: (r["job"], r["rank"]))  # type: ignore[no-any-return]
        status, result = together.ingest(json.dumps({"reports": chunk}).encode())
        got = [(e.index, e.errors[0].type, e.errors[0].loc[2:]) for e in result.rejected]
        expected = []
        for k, report in enumerate(chunk):
            _, one = alone.ingest(json.dumps({"reports": [report]}).encode())
            expected += [(k, e.errors[0].type, e.errors[0].loc[2:]) for e in one.rejected]
        assert got == expected
        rejected_alone += expected
    assert any(t == "cardinality_cap" for _, t, _ in rejected_alone)  # the caps were reached
    assert _state(together.store) == _state(alone.store)
