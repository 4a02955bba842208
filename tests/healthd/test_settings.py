from __future__ import annotations

import pytest

from healthd.rules import ALL_RULES, build_rules
from healthd.settings import ConfigError, Settings


def test_yaml_config_and_rule_thresholds(tmp_path) -> None:
    p = tmp_path / "h.yaml"
    p.write_text("port: 9999\nrules:\n  ExplodingGradients:\n    spike_factor: 20\n  LossDiverging:\n"
                 "    enabled: false\n")
    s = Settings.from_yaml(p)
    rules = build_rules(ALL_RULES, s.rules)
    names = {r.name for r in rules}
    assert s.port == 9999 and "LossDiverging" not in names
    (eg,) = [r for r in rules if r.name == "ExplodingGradients"]
    assert eg.config.spike_factor == 20


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("rules:\n  ExplodingGradients:\n    spike_factor: -1\n", "rules.ExplodingGradients.spike_factor"),
        ("rules:\n  NoSuchRule: {}\n", "rules.NoSuchRule: unknown rule"),
        ("store:\n  window_steps: 2\n", "store.window_steps"),
        ("rules:\n  LossDiverging:\n    typo_factor: 1\n", "rules.LossDiverging.typo_factor"),
    ],
)
def test_bad_config_names_the_field(tmp_path, text: str, needle: str) -> None:
    p = tmp_path / "h.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_rules(ALL_RULES, Settings.from_yaml(p).rules)
