"""MonitoringDegraded: a rank's heartbeat names quantities its client disabled; on-call sees them."""

from __future__ import annotations

import time

from healthd.rules.monitoring_degraded import MonitoringDegraded
from healthd.settings import StoreSettings
from healthd.state.store import Store
from healthd.wire.schema import DisabledQuantity, HeartbeatReport, Severity
from tests.live import LiveHealthd

_REASON = "failed in before_step: RuntimeError('got mixed torch.Tensor and DTensor')"


def _store(*disabled_by_rank: list[DisabledQuantity]) -> Store:
    store = Store(StoreSettings())
    for rank, disabled in enumerate(disabled_by_rank):
        store.apply(HeartbeatReport(job="j", rank=rank, time=1.0, step=7, disabled_quantities=disabled), 1.0)
    return store


def test_one_info_finding_per_rank_naming_quantities_and_reasons() -> None:
    store = _store([], [DisabledQuantity(name="grad_norm", reason=_REASON),
                        DisabledQuantity(name="update_ratio", reason="failed in after_step: KeyError('x')")])
    (finding,) = MonitoringDegraded().evaluate(store.job_window("j", 2.0))
    assert MonitoringDegraded.severity is Severity.INFO
    assert finding.rank == 1 and finding.step == 7
    assert "grad_norm, update_ratio" in finding.summary and "mixed torch.Tensor and DTensor" in finding.summary


def test_no_finding_when_every_quantity_is_measured() -> None:
    assert MonitoringDegraded().evaluate(_store([], []).job_window("j", 2.0)) == []


def test_status_page_and_alerts_show_the_disabled_quantity(healthd_server: LiveHealthd) -> None:
    report = HeartbeatReport(job="deg", rank=0, time=time.time(), step=3,
                             disabled_quantities=[DisabledQuantity(name="grad_norm", reason=_REASON)])
    assert healthd_server.post("/v1/reports", json={"reports": [report.model_dump(mode="json")]}).status_code == 200
    page = healthd_server.get("/").text
    assert "monitoring degraded: <code>grad_norm</code> not measured on rank(s) 0" in page
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rules = [a["rule"] for a in healthd_server.get("/v1/alerts", params={"job": "deg"}).json()["alerts"]]
        if "MonitoringDegraded" in rules:
            return
        time.sleep(0.2)
    raise AssertionError("MonitoringDegraded did not fire within 30 s")
