"""deploy/prometheus and deploy/k8s: generated files up to date, promtool check + unit tests pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from healthd.rules import ALL_RULES
from healthd.tools.deploy import CATCH_ALL, prometheus_rule_files
from tests.integration.servers import require_binary

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
HERE = Path(__file__).resolve().parent


def _promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_generated_rule_files_are_up_to_date() -> None:
    for rel, text in prometheus_rule_files().items():
        assert (DEPLOY / rel).read_text() == text, f"deploy/{rel} is stale: run `healthd deploy export`"


def test_promtool_accepts_the_rule_files() -> None:
    files = sorted(str(p) for p in (DEPLOY / "prometheus").glob("*.rules.yml"))
    assert len(files) == 2
    r = _promtool("check", "rules", *files)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_rule_has_an_alert_and_the_prometheus_rule_matches() -> None:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "healthd-alerts.rules.yml").read_text())["groups"]
    names = [r["alert"] for r in groups[0]["rules"]]
    assert names[: len(ALL_RULES)] == [r.name for r in ALL_RULES] and CATCH_ALL in names
    operator = yaml.safe_load((DEPLOY / "k8s" / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule" and operator["spec"]["groups"][0] == groups[0]


def test_promtool_unit_tests_raw_series_and_recording_rules() -> None:
    r = _promtool("test", "rules", str(HERE / "healthd-rules.test.yml"))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_unit_tests_every_catalog_rule(tmp_path: Path) -> None:
    """Each rule's series becomes an alert named after it, with job/rank/severity labels and its advice."""
    tests = []
    for rule in ALL_RULES:
        rank_wide = {"rank": "3"} if rule.name != "StragglerRank" else {}
        labels = {"job": "train/x y", "rule": rule.name, "severity": rule.severity.value, **rank_wide}
        series = "trainhealth_alert{" + ",".join(f'{k}="{v}"' for k, v in {**labels, "rank": labels.get(
            "rank", "")}.items()) + "}"
        where = "job train/x y" + (" rank 3" if rank_wide else "")
        tests.append({
            "interval": "1m",
            "input_series": [{"series": series, "values": "0 1 1 1"}],
            "alert_rule_test": [
                {"eval_time": "0m", "alertname": rule.name, "exp_alerts": []},
                {"eval_time": "2m", "alertname": rule.name, "exp_alerts": [{
                    "exp_labels": {**labels, "source": "prometheus"},
                    "exp_annotations": {
                        "summary": f"{rule.name} on {where}",
                        "description": _description(rule),
                        "advice": rule.advice,
                        "healthd_url": "http://healthd:9184/v1/alerts?job=train%2Fx+y",
                    }}]},
            ],
        })
    f = tmp_path / "catalog.test.yml"
    f.write_text(yaml.safe_dump({
        "rule_files": [str(DEPLOY / "prometheus" / "healthd-alerts.rules.yml")],
        "evaluation_interval": "1m", "tests": tests}))
    r = _promtool("test", "rules", str(f))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def _description(rule: type) -> str:
    doc = (rule.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in doc.splitlines()).replace("``", "") + \
        " Evidence (step, values): see healthd_url."
