"""Alerts healthd answers with reach the training thread: ``monitor.alerts``, ``on_alert``, ``stop_on``."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import torch

import healthd_client
from healthd.wire.schema import FiringAlert as WireAlert
from healthd.wire.schema import IngestResult, Severity
from healthd_client import FiringAlert, TrainingStopped
from healthd_client.alerts import parse_alerts
from tests.client.conftest import Net, RecordingTransport, train_steps

NAN_ALERT = WireAlert(id="a1", rule="NonFiniteValues", severity=Severity.CRITICAL, job="test-job", rank=0, step=7,
                      summary="Non-finite values in loss at step 7 (rank 0); loss=nan",
                      evidence={"step": 7, "loss": float("nan"), "nonfinite_loss": 1})
PLATEAU = WireAlert(id="a2", rule="LossPlateau", severity=Severity.WARNING, job="test-job", rank=None, step=3,
                    summary="loss flat", evidence={})


class Answering(RecordingTransport):
    """Answers as healthd does (``IngestResult``), listing ``self.firing`` as the job's alerts."""

    def __init__(self) -> None:
        super().__init__(self._answer)
        self.firing: list[WireAlert] = []

    def _answer(self, body: bytes) -> tuple[int, str]:
        n = len(json.loads(body)["reports"])
        return 200, IngestResult(accepted=n, alerts=list(self.firing)).model_dump_json()


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _train_until_stopped(model: Net, optimizer: torch.optim.Optimizer, monitor: Any) -> None:
    """Train (each step pushes its report) until a step raises TrainingStopped."""
    for _ in range(3000):
        train_steps(model, optimizer, monitor, 1)
        time.sleep(0.01)  # stands for a step's work: the answer to a push comes back meanwhile
    raise AssertionError("not stopped after 3000 steps")


def _train_until(model: Net, optimizer: torch.optim.Optimizer, monitor: Any, condition: Any) -> None:
    for _ in range(3000):
        if condition():
            return
        train_steps(model, optimizer, monitor, 1)
        time.sleep(0.01)
    raise AssertionError("condition not met")


def test_the_answer_is_parsed_as_the_server_writes_it() -> None:
    text = IngestResult(accepted=2, alerts=[NAN_ALERT, PLATEAU]).model_dump_json()
    alerts = parse_alerts(text)
    assert alerts is not None and [a.rule for a in alerts] == ["NonFiniteValues", "LossPlateau"]
    assert alerts[0].rank == 0 and alerts[0].evidence["nonfinite_loss"] == 1 and alerts[1].rank is None
    assert parse_alerts('{"accepted": 2}') == ()  # healthd leaves the field out when nothing fires
    assert parse_alerts("<html>bad gateway</html>") is None
    assert parse_alerts('{"alerts": [{"rule": "X"}, 3]}') == ()  # malformed entries are skipped


def test_alerts_are_visible_and_off_by_default(make_monitor: Any) -> None:
    transport = Answering()
    model, optimizer = Net(), None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, transport=transport)
    transport.firing = [NAN_ALERT]
    train_steps(model, optimizer, monitor, 1)
    _wait_for(lambda: monitor.alerts, "the alert to come back")
    train_steps(model, optimizer, monitor, 3)  # no policy: nothing raised
    assert [a.rule for a in monitor.alerts] == ["NonFiniteValues"] and monitor.stopped_by is None
    transport.firing = []
    train_steps(model, optimizer, monitor, 1)
    _wait_for(lambda: not monitor.alerts, "the alert to clear")


def test_on_alert_runs_on_the_training_thread_once_per_alert(make_monitor: Any) -> None:
    transport = Answering()
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    told: list[tuple[str, str]] = []
    monitor = make_monitor(model, optimizer, transport=transport,
                           on_alert=lambda a: told.append((a.rule, threading.current_thread().name)))
    transport.firing = [PLATEAU]
    _train_until(model, optimizer, monitor, lambda: told)
    transport.firing = [PLATEAU, NAN_ALERT]
    _train_until(model, optimizer, monitor, lambda: len(told) == 2)
    train_steps(model, optimizer, monitor, 3)
    main = threading.current_thread().name
    assert told == [("LossPlateau", main), ("NonFiniteValues", main)]


def test_stop_on_calls_on_stop_then_raises_once_naming_the_alert(make_monitor: Any) -> None:
    transport = Answering()
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list[str] = []
    monitor = make_monitor(model, optimizer, transport=transport, stop_on=("NonFiniteValues",),
                           on_stop=lambda a: events.append(f"checkpoint {a.rule}"))
    transport.firing = [PLATEAU]  # not a stop_on alert
    train_steps(model, optimizer, monitor, 1)
    _wait_for(lambda: monitor.alerts, "the alert to come back")
    train_steps(model, optimizer, monitor, 2)
    transport.firing = [NAN_ALERT]
    with pytest.raises(TrainingStopped) as stopped:
        _train_until_stopped(model, optimizer, monitor)
    assert events == ["checkpoint NonFiniteValues"]
    assert isinstance(stopped.value.alert, FiringAlert) and stopped.value.alert.rule == "NonFiniteValues"
    message = str(stopped.value)
    assert "NonFiniteValues" in message and "step 7" in message and "nonfinite_loss=1" in message
    assert monitor.stopped_by == stopped.value.alert
    train_steps(model, optimizer, monitor, 2)  # the user caught it and goes on: not raised again


def test_the_optimizer_step_raises_before_the_update_without_monitor_step(make_monitor: Any) -> None:
    transport = Answering()
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    transport.firing = [NAN_ALERT]  # the answer to the attach report already says so
    monitor = make_monitor(model, optimizer, transport=transport, stop_on=("NonFiniteValues",))
    _wait_for(lambda: monitor.alerts, "the alert to come back")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingStopped):
        train_steps(model, optimizer, None, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_failing_callback_warns_and_still_stops(make_monitor: Any) -> None:
    transport = Answering()
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def broken(alert: FiringAlert) -> None:
        raise OSError("disk full")

    monitor = make_monitor(model, optimizer, transport=transport, strict=False, stop_on=("NonFiniteValues",),
                           on_stop=broken)
    transport.firing = [NAN_ALERT]
    with pytest.warns(RuntimeWarning, match="on_stop callback failed"), pytest.raises(TrainingStopped):
        _train_until_stopped(model, optimizer, monitor)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"stop_on": "NonFiniteValues"}, "tuple of alert names"),
    ({"stop_on": ("Non Finite",)}, "alert names"),
    ({"on_alert": "print"}, "on_alert must be a callable"),
    ({"on_stop": print}, "give stop_on too"),
])
def test_bad_alert_arguments_are_refused(kwargs: dict[str, Any], match: str) -> None:
    model = Net()
    with pytest.raises(ValueError, match=match):
        healthd_client.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), job="j",
                              transport=RecordingTransport(), **kwargs)
