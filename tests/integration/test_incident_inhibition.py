"""One page per incident: the demo's learning-rate fault, pushed to a real Alertmanager with the generated
inhibit rules, leaves at most two warning-or-worse alerts un-muted for the job, its likely cause among them."""

from __future__ import annotations

from typing import Any

from healthd.settings import Settings
from healthd.tools.demo import run_demo
from healthd.tools.deploy import inhibit_rules
from tests.integration.servers import DEFAULT_ALERTMANAGER_CONFIG, alertmanager, wait_until

JOB = "demo-lr-too-high"


def test_lr_fault_pages_once_with_its_cause() -> None:
    config = {**DEFAULT_ALERTMANAGER_CONFIG, "inhibit_rules": inhibit_rules()}
    with alertmanager(config) as am:
        # resend 30 s: what healthd pushed stays active in Alertmanager for 120 s after the demo's healthd stops.
        settings = Settings.from_mapping({"alertmanager": {"url": am.url, "resend_seconds": 30.0}})
        lines: list[str] = []
        assert run_demo("lr-too-high", live=False, out=lines.append, settings=settings) == 0, "\n".join(lines)

        def loud(**filters: str) -> list[dict[str, Any]]:
            params = [("filter", f'job="{JOB}"'), ("active", "true"), *filters.items()]
            found: list[dict[str, Any]] = am.get("/api/v2/alerts", params=params).json()
            return [a for a in found if a["labels"]["severity"] in ("warning", "critical")]

        everything = wait_until(lambda: loud() if len(loud()) >= 3 else None, what="the fault's alerts pushed",
                                log=am.log_tail)
        pages = wait_until(lambda: p if len(p := loud(inhibited="false")) <= 2 else None,
                           what=f"at most 2 un-inhibited alerts of {len(everything)}", log=am.log_tail)
        names = {a["labels"]["alertname"] for a in pages}
        assert "LearningRateTooHigh" in names, (names, [a["labels"]["alertname"] for a in everything])
        for a in everything:
            if a["labels"]["alertname"] not in names:
                assert a["annotations"].get("caused_by"), a
                assert a["status"]["inhibitedBy"], a
        assert any("Incident 1: likely cause LearningRateTooHigh" in line for line in lines), "\n".join(lines)
