"""deploy/alertmanager: generated from the incident graph, up to date, accepted by amtool, one inhibition per edge."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from healthd.engine.incidents import GRAPH
from healthd.tools.deploy import deploy_files
from tests.integration.servers import require_binary

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"


def test_generated_alertmanager_config_is_up_to_date_and_valid() -> None:
    assert CONFIG.read_text() == deploy_files()["alertmanager/alertmanager.yml"], \
        "deploy/alertmanager/alertmanager.yml is stale: run `healthd deploy export`"
    r = subprocess.run([require_binary("amtool"), "check-config", str(CONFIG)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_cause_consequence_edge_is_an_inhibition_on_the_right_labels() -> None:
    rules = yaml.safe_load(CONFIG.read_text())["inhibit_rules"]
    covered = set()
    for rule in rules[1:]:  # the first mutes Prometheus' copies of healthd's own alerts
        (source,) = rule["source_matchers"]
        (target,) = rule["target_matchers"]
        cause = re.fullmatch(r'alertname="(\w+)"', source)
        effects = re.fullmatch(r'alertname=~"([\w|]+)"', target)
        assert cause and effects, rule
        for effect in effects.group(1).split("|"):
            assert tuple(rule["equal"]) == GRAPH.equal_labels(cause.group(1), effect)
            covered.add((cause.group(1), effect))
    assert covered == set(GRAPH.edges())
    assert ("LearningRateTooHigh", "LossDiverging") in covered and ("RankStalled", "StragglerRank") in covered
