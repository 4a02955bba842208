"""The report groups a job's alerts by incident: the likely cause first, its consequences under it."""

from __future__ import annotations

from typing import Any

from healthd.tools.report import render_report


def _alert(id_: str, rule: str, started_at: float, incident: str | None,
           caused_by: str | None = None) -> dict[str, Any]:
    return {"id": id_, "rule": rule, "severity": "warning", "state": "firing", "job": "j", "rank": 0, "layer": None,
            "step": 1, "last_step": 1, "summary": f"{rule} seen", "evidence": {}, "advice": "",
            "started_at": started_at, "updated_at": started_at, "resolved_at": None, "incident": incident,
            "caused_by": caused_by}


def test_report_lists_an_incident_cause_first_with_its_consequences() -> None:
    alerts = [_alert("a", "LossDiverging", 1.0, "c", "LearningRateTooHigh"),
              _alert("b", "Overfitting", 1.5, "b"),
              _alert("c", "LearningRateTooHigh", 2.0, "c"),
              _alert("d", "DeadActivations", 3.0, "c", "LearningRateTooHigh"),
              {**_alert("e", "LossPlateau", 4.0, None), "incident": None}]  # never fired / older server
    page = render_report({"job": "j", "ranks": {}, "alerts": alerts, "attach": None})
    assert page.count('<tr class="incident">') == 1
    assert "Incident: likely cause LearningRateTooHigh</b>, 2 consequence(s)" in page
    order = [page.index(f'data-rule="{r}"') for r in ("LearningRateTooHigh", "LossDiverging", "DeadActivations")]
    assert order == sorted(order) and page.index("Incident: likely cause") < order[0]
    assert page.count("caused by LearningRateTooHigh") == 2
    assert 'data-rule="Overfitting"' in page and 'data-rule="LossPlateau"' in page
