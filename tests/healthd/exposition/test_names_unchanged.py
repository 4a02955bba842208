"""The names users build on stay put: /metrics families (type and label names) and the alert catalog.

Dashboards, recording rules, Alertmanager routes and silences match on these names. The snapshot
(``names.snapshot``) was taken from the build before the server's reorganization into layer packages
and is the contract since: a change to it is a breaking change for users and must be made on purpose.
"""

from __future__ import annotations

import re
from pathlib import Path

from healthd.rules import ALL_RULES
from tests.healthd.run_data import post_run
from tests.live import live_healthd

SNAPSHOT = Path(__file__).with_name("names.snapshot")
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="')


def names(exposition: str) -> list[str]:
    """One line per metric family (name, type, label names seen) and per rule (name, severity, scope)."""
    families: dict[str, tuple[str, set[str]]] = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families.setdefault(name, (kind, set()))
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m is not None, line
            name = m.group(1)
            family = next((f for f in families if name == f or name.startswith(f + "_")), name)
            families.setdefault(family, ("?", set()))[1].update(_LABEL.findall(m.group(3) or ""))
    out = [f"metric {n} {kind} {','.join(sorted(labels))}" for n, (kind, labels) in sorted(families.items())]
    out += [f"alert {r.name} {r.severity.value} {r.scope.value}" for r in sorted(ALL_RULES, key=lambda r: r.name)]
    return out


def test_metric_families_and_alert_names_are_those_users_built_on() -> None:
    with live_healthd() as live:
        post_run(live)  # attach, steps with layers, evals, GPU samples and a NaN: every family has a sample
        exposition = live.get("/metrics").text
    assert names(exposition) == SNAPSHOT.read_text().splitlines()


def test_the_snapshot_check_sees_a_renamed_family_and_a_dropped_label() -> None:
    text = '# TYPE trainhealth_loss gauge\ntrainhealth_loss{job="j",rank="0"} 1.0\n'
    assert names(text)[0] == "metric trainhealth_loss gauge job,rank"
    assert names(text.replace("trainhealth_loss", "trainhealth_loss_value"))[0] != names(text)[0]
    assert names(text.replace(',rank="0"', ""))[0] == "metric trainhealth_loss gauge job"
