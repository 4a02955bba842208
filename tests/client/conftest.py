"""Fixtures for the client tests: a recording transport, small models, schema validation."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pydantic
import pytest
import torch

import healthd_client
from healthd.wire.schema import ReportBatch
from healthd_client import MonitorConfig

BATCH = pydantic.TypeAdapter(ReportBatch)

# Fast timers so that nothing in the tests waits long; generous timeouts so that
# nothing depends on the machine being fast.
FAST = dict(flush_interval_seconds=0.01, heartbeat_seconds=60.0, close_timeout_seconds=5.0)


class RecordingTransport:
    """Records every body; answers with ``respond(body) -> (status, text)`` (default 200)."""

    def __init__(self, respond: Callable[[bytes], tuple[int, str]] | None = None) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.respond = respond
        self.lock = threading.Lock()

    def send(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
        with self.lock:
            self.bodies.append(body)
            self.headers.append(dict(headers))
        if self.respond is not None:
            return self.respond(body)
        return 200, json.dumps({"accepted": len(json.loads(body)["reports"])})

    def reports(self) -> list[dict[str, Any]]:
        with self.lock:
            bodies = list(self.bodies)
        return [r for body in bodies for r in json.loads(body)["reports"]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.reports() if r["kind"] == kind]


def validate(body: bytes) -> ReportBatch:
    return BATCH.validate_json(body)


class Net(torch.nn.Module):
    """Two named sub-modules, a nested one and a parameter on the root."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        self.head = torch.nn.Linear(3, 2)
        self.scale = torch.nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)) * self.scale


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, monitor: Any, steps: int) -> list[float]:
    """Run ``steps`` ordinary steps on random data; return the losses."""
    losses = []
    for _ in range(steps):
        x = torch.randn(5, 4)
        y = torch.randint(0, 2, (5,))
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss=loss, batch_size=len(x))
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
def make_monitor(transport: RecordingTransport) -> Iterator[Callable[..., Any]]:
    """attach() with the recording transport and fast timers; closes what it made."""
    made: list[Any] = []

    def make(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        config = kwargs.pop("config", None) or MonitorConfig(**{**FAST, **kwargs.pop("config_kwargs", {})})
        kwargs.setdefault("job", "test-job")
        kwargs.setdefault("strict", True)
        kwargs.setdefault("transport", transport)
        monitor = healthd_client.attach(model, optimizer, config=config, **kwargs)
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        monitor.close(timeout=1.0)


def step_reports(transport: RecordingTransport) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in transport.of_kind("step")}
