"""healthd.rules.base: Rule[W, C] derives its scope and checks its hints; configs keep the shared fields'
validation. (The window readers' tests live in tests/healthd/state/test_windows.py.)"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from pydantic import Field, ValidationError

from healthd.rules import ALL_RULES
from healthd.rules.base import ForSteps, Hints, Rule, RuleConfig, Scope, WindowedConfig, WindowSteps
from healthd.state.windows import JobWindow, RankWindow


def test_scope_comes_from_the_window_type() -> None:
    assert all(r.scope is (Scope.JOB if r.evaluate.__annotations__["window"] == "JobWindow" else Scope.RANK)
               for r in ALL_RULES)

    class OnJob(Rule[JobWindow, RuleConfig]):
        name: ClassVar[str] = "OnJob"
        Config = RuleConfig

    assert OnJob.scope is Scope.JOB and OnJob().config == RuleConfig()


def test_a_scope_that_contradicts_the_window_type_is_refused() -> None:
    with pytest.raises(TypeError, match="contradicts"):
        class Confused(Rule[RankWindow, RuleConfig]):
            scope: ClassVar[Scope] = Scope.JOB


def test_hints_are_checked_against_the_scope() -> None:
    with pytest.raises(TypeError, match="rank_summary"):
        class NoSummary(Rule[JobWindow, RuleConfig]):
            hints: ClassVar[Hints] = Hints(summarized=True)
    with pytest.raises(TypeError, match="rank rules only"):
        class ReadsOnJob(Rule[JobWindow, RuleConfig]):
            hints: ClassVar[Hints] = Hints(reads=("inputs",))


@pytest.mark.parametrize("field", ["for_steps", "resolve_after_steps"])
@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.name)
def test_every_rule_validates_the_shared_fields(rule: type[Rule[Any, Any]], field: str) -> None:
    with pytest.raises(ValidationError):
        rule.Config(**{field: 0})


@pytest.mark.parametrize("rule", [r for r in ALL_RULES if issubclass(r.Config, WindowedConfig)], ids=lambda r: r.name)
def test_windowed_rules_refuse_an_empty_window(rule: type[Rule[Any, Any]]) -> None:
    with pytest.raises(ValidationError):
        rule.Config(window_steps=0)


def test_a_config_that_drops_a_shared_fields_validation_is_refused() -> None:
    with pytest.raises(TypeError, match="for_steps"):
        class Loose(RuleConfig):
            for_steps: int = 3
    with pytest.raises(TypeError, match="window_steps"):
        class LooseWindow(WindowedConfig):
            window_steps: int = 3

    class Tight(WindowedConfig):
        for_steps: ForSteps = 3
        window_steps: int = Field(default=10, ge=5, description="a tighter bound is fine")

    assert Tight().for_steps == 3
    with pytest.raises(ValidationError):
        Tight(window_steps=4)
    with pytest.raises(TypeError, match="window_steps"):
        class Looser(Tight):
            window_steps: WindowSteps = 10  # ge=1 < Tight's ge=5
