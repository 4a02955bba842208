"""End to end on real servers: a real training run with a fault -> healthd -> Prometheus + Alertmanager.

The run (tiny MLP on the CPU, healthd_client attached) feeds a corrupt batch
(NaN in the input) for a while; the loop skips those updates, as guarded loops
do, so the fault goes away when the bad data stops. We check:

- Prometheus scrapes healthd (``up == 1``);
- every PromQL expression of every dashboard panel returns data from that
  Prometheus (GPU and DDP panels are fed by a second, synthetic job posting GPU
  samples and local/all-reduced gradient norms: this machine has no GPU and the
  run is a single process);
- the alert reaches Alertmanager both directly (healthd's push) and through the
  Prometheus rule generated from the catalog, with the documented labels and
  annotations; both resolve once the fault is gone.
"""

from __future__ import annotations

import json
import time
from typing import Any

from healthd_dashboards import dashboards, expressions
from tests.integration.conftest import deploy_rule_files, stack_settings
from tests.integration.servers import Alertmanager, Prometheus, alertmanager, prometheus, wait_until
from tests.integration.training import Run
from tests.live import LiveHealthd, live_healthd

JOB = "e2e"
DDP_JOB = "e2e-ddp"
RULE = "NonFiniteValues"


def _post_ddp_and_gpu(hd: LiveHealthd, start: int, n: int) -> None:
    now = time.time()
    reports: list[dict[str, Any]] = []
    if start == 0:
        reports += [{"kind": "attach", "job": DDP_JOB, "rank": r, "time": now, "world_size": 2} for r in (0, 1)]
    for i in range(start, start + n):
        for r in (0, 1):
            reports.append({"kind": "step", "job": DDP_JOB, "rank": r, "time": now, "step": i, "loss": 1.0,
                            "grad_norm": 1.0, "grad_norm_local": 1.3 + 0.1 * r, "grad_norm_allreduced": 1.0,
                            "batch_size": 32, "step_seconds": 0.1 + 0.05 * r, "update_ratio": 1e-3, "lr": [0.1]})
    for r in (0, 1):
        reports.append({"kind": "gpu", "job": DDP_JOB, "rank": r, "time": now, "gpu": r, "uuid": f"GPU-{r}",
                        "hostname": "node-1", "memory_used_bytes": 10_000_000_000, "memory_total_bytes": 80 * 10**9,
                        "torch_allocated_bytes": 8 * 10**9, "torch_reserved_bytes": 9 * 10**9,
                        "utilization_gpu_ratio": 0.9, "temperature_celsius": 60.0})
    r = hd.post("/v1/reports", content=json.dumps({"schema_version": 1, "reports": reports}))
    assert r.status_code == 200, r.text


def _panel_queries() -> list[tuple[str, str, str]]:
    subs = {"$__rate_interval": "10s", "$__interval": "5s", "$topk": "5", "$job": f"{JOB}|{DDP_JOB}",
            "$rank": ".*", "$stream": ".*"}
    out = []
    for uid, model in dashboards().items():
        for title, expr in expressions(model):
            for k, v in subs.items():
                expr = expr.replace(k, v)
            assert "$" not in expr, (uid, title, expr)
            out.append((uid, title, expr))
    return out


def _direct(a: dict[str, Any], hd: LiveHealthd) -> bool:
    return "source" not in a["labels"] and a["generatorURL"].startswith(hd.url)


def _via_prometheus(a: dict[str, Any]) -> bool:
    return a["labels"].get("source") == "prometheus"


def test_faulty_run_alerts_directly_and_via_prometheus_and_every_dashboard_query_has_data() -> None:
    with alertmanager() as am:
        settings = stack_settings(am.url, rules={RULE: {"resolve_after_steps": 5}})
        with live_healthd(settings) as hd, prometheus([hd.url], rule_files=deploy_rule_files(),
                                                      alertmanager_url=am.url) as prom:
            _run(hd, prom, am)


def _run(hd: LiveHealthd, prom: Prometheus, am: Alertmanager) -> None:
    prom.wait_for('up{job="healthd"} == 1')
    run = Run(JOB, hd.url)
    try:
        for _ in range(30):
            run.step()
        run.eval()
        _post_ddp_and_gpu(hd, 0, 30)

        # The fault: corrupt batches until both paths delivered the alert (bounded by the wait).
        found: dict[str, dict[str, Any]] = {}

        def delivered() -> bool:
            run.step(nan_input=True)
            for a in am.alerts(alertname=RULE, job=JOB, active_only=True):
                if _direct(a, hd):
                    found["direct"] = a
                elif _via_prometheus(a):
                    found["prometheus"] = a
            return len(found) == 2

        wait_until(delivered, timeout_seconds=90, interval_seconds=0.05, what="alert via both paths",
                   log=am.log_tail)
        direct, via = found["direct"], found["prometheus"]
        assert direct["labels"] == {"alertname": RULE, "severity": "critical", "job": JOB, "rank": "0"}
        assert {k: via["labels"][k] for k in ("alertname", "severity", "job", "rank")} == direct["labels"]
        base = {"summary", "description", "advice", "healthd_url"}
        # Direct pushes also say which incident the alert belongs to (and its likely cause, when another
        # alert explains it); the Prometheus path's alerts come from trainhealth_alert and carry neither.
        assert "incident" in direct["annotations"] and set(direct["annotations"]) - {"incident", "caused_by"} == base
        assert set(via["annotations"]) == base
        for a in (direct, via):
            assert "learning rate" in a["annotations"]["advice"].lower()
        assert "loss" in direct["annotations"]["description"] and "step=" in direct["annotations"]["description"]
        assert direct["annotations"]["healthd_url"] == f"{hd.url}/v1/alerts?job={JOB}"

        # Every dashboard query returns data while the alert fires (the alerts table needs one).
        _post_ddp_and_gpu(hd, 30, 10)
        missing = []
        for uid, title, expr in _panel_queries():
            try:
                wait_until(lambda e=expr: prom.query(e), timeout_seconds=20, what=expr)  # type: ignore[misc]
            except Exception:
                missing.append(f"{uid} / {title}: {expr}")
        assert not missing, "dashboard queries without data:\n" + "\n".join(missing)

        # The fault goes away: clean steps resolve it in healthd, then in Alertmanager on both paths.
        def resolved() -> bool:
            run.step()
            return not am.alerts(alertname=RULE, job=JOB, active_only=True)

        wait_until(resolved, timeout_seconds=90, interval_seconds=0.05, what="alert resolved on both paths",
                   log=am.log_tail)
        states = {a["state"] for a in hd.get("/v1/alerts", params={"job": JOB}).json()["alerts"]
                  if a["rule"] == RULE}
        assert states == {"resolved"}
    finally:
        run.close()
