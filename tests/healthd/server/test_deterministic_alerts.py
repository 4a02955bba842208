"""Alerts are a function of the series alone: the same steps give the same alerts however they are
batched into requests and whenever the CPU budget lets their rank's rules run.

Each series is a real training run of the fault zoo (NaN, explosion, divergence, plateau, learning
rate too high, and healthy controls), recorded once from the client and replayed three ways: one
step per request with no budget; 50 reports per request; and a starved budget, where no request's
ranks are judged and a late sweep judges what waited every 40 reports (a rank then lags less than
the steps a waiting checkpoint's window can be rebuilt from, so nothing is shed).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from bench.faultzoo.scenarios import SCENARIOS
from healthd.engine.alerts import Alert
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.wire.schema import AlertState

SERIES = ("nan_input", "error_explodes", "gradient_spike", "error_goes_up_sign_flip", "labels_shuffled",
          "lr_too_high_adam", "ctrl_mlp_adam", "ctrl_regression_mse")


class Recorder:
    """A healthd_client transport that keeps every report it is given (and accepts them all)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def send(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
        self.reports.extend(json.loads(body)["reports"])
        return 200, json.dumps({"accepted": 0, "rejected": []})


@pytest.fixture(scope="module")
def recorded() -> dict[str, list[dict[str, Any]]]:
    """The reports each scenario's client sent (step, attach, eval...), in order."""
    from healthd_client import MonitorConfig, attach

    torch.set_num_threads(1)
    by_name = {s.name: s for s in SCENARIOS}
    out = {}
    for name in SERIES:
        setup = by_name[name].setup()
        rec = Recorder()
        monitor = attach(setup.model, setup.optimizer, job=name, transport=rec,
                         config=MonitorConfig(flush_interval_seconds=60.0, heartbeat_seconds=60.0),
                         strict=True, **setup.hints)
        setup.train(monitor)
        monitor.close()
        out[name] = [r for r in rec.reports if r["kind"] != "heartbeat"]  # heartbeats carry wall time
    return out


Outcome = list[tuple[str, int | None, str, int | None, int | None]]


def _outcome(hd: Healthd, job: str) -> Outcome:
    """Every alert the job ever raised: (rule, rank, state, firing step, resolve step)."""
    alerts: list[Alert] = hd.engine.alerts(job)
    return sorted((a.rule, a.rank, a.state.value, a.fired_step, a.resolved_step) for a in alerts
                  if a.state is not AlertState.PENDING or a.fired_step is not None)


def _replay(reports: list[dict[str, Any]], per_request: int, settings: Mapping[str, Any],
            after: Callable[[Healthd], None] = lambda hd: None) -> Healthd:
    hd = build(Settings.from_mapping({"engine": settings}))
    for i in range(0, len(reports), per_request):
        status, result = hd.ingest(json.dumps({"schema_version": 1, "reports": reports[i:i + per_request]}).encode())
        assert status == 200, result
    after(hd)
    return hd


def _starve(hd: Healthd) -> None:
    """No CPU budget at all: every rank waits in the queue (nothing refills it, nothing is urgent enough
    to count: urgent evaluations still run, as in production)."""
    hd.queue.share, hd.queue.burst_seconds = 1e-12, 0.0
    hd.queue.charge(1.0)


@pytest.mark.parametrize("name", SERIES)
def test_the_same_steps_give_the_same_alerts_however_they_are_batched(
        name: str, recorded: dict[str, list[dict[str, Any]]]) -> None:
    reports = recorded[name]
    one = _replay(reports, 1, {"rank_rules_cpu_share": 1.0})
    fifty = _replay(reports, 50, {"rank_rules_cpu_share": 1.0})
    starved = build(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 0.5}}))
    _starve(starved)
    for i in range(0, len(reports), 10):
        starved.ingest(json.dumps({"schema_version": 1, "reports": reports[i:i + 10]}).encode())
        if i % 40 == 30:
            starved.settle()  # the late sweep
    starved.settle()
    assert starved.queue.shed_total == 0
    expected = _outcome(one, name)
    assert _outcome(fifty, name) == expected
    assert _outcome(starved, name) == expected
    scenario = next(s for s in SCENARIOS if s.name == name)
    if scenario.expected is not None:  # the series do show their fault
        assert scenario.expected in {o[0] for o in expected if o[3] is not None}
