"""Chaos: a real training run while a real ``healthd serve --db`` is killed (-9) and restarted twice.

The run must finish untouched, the alert that fired before the first kill must still be there (and the
same alert, not a new one), and the drop count healthd shows must equal what the client dropped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import healthd_client
from healthd.exposition import catalog as C
from healthd_client import MonitorConfig
from tests.integration.healthd_process import HealthdProcess

pytestmark = pytest.mark.integration

# A small queue so the downtime really drops reports; fast heartbeats so the count travels quickly.
CONFIG = MonitorConfig(queue_capacity=32, max_batch_reports=16, flush_interval_seconds=0.05, heartbeat_seconds=0.2,
                       request_timeout_seconds=0.5, close_timeout_seconds=5.0, retry_backoff_min_seconds=0.02,
                       retry_backoff_max_seconds=0.2)
JOB = "chaos"
NAN_STEP = 20


def _dropped_on_server(hd: HealthdProcess) -> int | None:
    text = httpx.get(hd.url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == C.CLIENT_DROPPED_TOTAL.name and s.labels["job"] == JOB:
                return int(s.value)
    return None


def _wait_for_firing(hd: HealthdProcess, rule: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        for a in httpx.get(hd.url + "/v1/alerts", params={"job": JOB}, timeout=5).json()["alerts"]:
            if a["rule"] == rule and a["state"] == "firing":
                return str(a["id"])
        assert time.monotonic() < deadline, f"{rule} never fired"
        time.sleep(0.05)


def test_training_survives_two_kill9_restarts_and_nothing_is_lost_unaccounted(tmp_path: Path) -> None:
    hd = HealthdProcess(tmp_path)
    hd.start()
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, y = torch.randn(64, 16), torch.randn(64, 1)
        events = {60: hd.kill9, 160: hd.start, 220: hd.kill9, 320: hd.start}
        completed = 0
        with healthd_client.attach(model, opt, job=JOB, server=hd.url, config=CONFIG) as monitor:
            # The fault's alert fires before the first kill, so it must survive two restarts.
            for step in range(400):
                if step in events:
                    events[step]()
                xb = x.clone()
                if step == NAN_STEP:
                    xb[0, 0] = math.nan  # Adam spreads it into every weight: the loss stays NaN from here on
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(xb), y)
                loss.backward()
                opt.step()
                monitor.step(loss=loss, batch_size=64)
                completed += 1
                time.sleep(0.005)
                if step == NAN_STEP + 1:
                    first_id = _wait_for_firing(hd, "NonFiniteValues")
        assert completed == 400  # the job ran to the end through both outages
        sender = monitor.sender
        assert sender.dropped_total > 0  # the outages really dropped reports (queue of 32)
        assert _dropped_on_server(hd) == sender.dropped_total  # ...and healthd was told exactly how many
        assert hd.starts == 3
        alerts = httpx.get(hd.url + "/v1/alerts", params={"job": JOB}, timeout=5).json()["alerts"]
        nonfinite = [a for a in alerts if a["rule"] == "NonFiniteValues"]
        # One alert, the one raised at the fault's step before the kills: restored, not re-raised as new.
        assert [(a["id"], a["step"], a["state"]) for a in nonfinite] == [(first_id, NAN_STEP, "firing")]
    finally:
        hd.stop()
