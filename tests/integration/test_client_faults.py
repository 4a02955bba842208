"""The client under faults, against real servers: healthd down, slow, answering 5xx; fork; misuse.

Step times are measured and printed (``-s``), never asserted: the guarantees asserted are
the bounded queue, the drop accounting reaching healthd once it is back, and that nothing
reaches the training loop.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

import healthd_client
from healthd.exposition import catalog as C
from healthd.server.app import create_app
from healthd.server.embedded import free_port
from healthd.settings import Settings
from healthd_client.config import MonitorConfig
from healthd_client.quantities.base import Quantity

pytestmark = pytest.mark.integration

FAST = MonitorConfig(queue_capacity=64, max_batch_reports=16, flush_interval_seconds=0.05, heartbeat_seconds=0.2,
                     request_timeout_seconds=0.5, close_timeout_seconds=2.0, retry_backoff_min_seconds=0.02,
                     retry_backoff_max_seconds=0.1)


class _Faulty:
    """ASGI wrapper: answer 503, or sleep, on POST /v1/reports while the fault is on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.mode = "ok"  # "ok" | "503" | "slow"
        self.faulted = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/reports" and self.mode != "ok":
            self.faulted += 1
            if self.mode == "slow":
                await asyncio.sleep(3.0)
            else:
                await send({"type": "http.response.start", "status": 503, "headers": []})
                await send({"type": "http.response.body", "body": b"down for maintenance"})
                return
        await self.app(scope, receive, send)


@contextmanager
def _server(port: int) -> Iterator[tuple[_Faulty, object]]:
    app = create_app(Settings())
    faulty = _Faulty(app)
    server = uvicorn.Server(uvicorn.Config(faulty, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield faulty, app.state.healthd
    finally:
        server.should_exit = True
        thread.join(10)


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, monitor, steps: int) -> list[float]:
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(loss=loss, batch_size=64)
        times.append(time.perf_counter() - t0)
    return times


def _dropped_on_server(hd, job: str) -> int | None:
    from prometheus_client import generate_latest

    text = generate_latest(hd.registry).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == C.CLIENT_DROPPED_TOTAL.name and s.labels["job"] == job:
                return int(s.value)
    return None


def _wait(fn, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_unreachable_then_back_bounded_queue_and_drops_reported() -> None:
    model, opt = _model()
    baseline = _train(model, opt, None, 100)
    port = free_port()  # nothing listens here yet
    monitor = healthd_client.attach(model, opt, job="faults-down", server=f"http://127.0.0.1:{port}", config=FAST)
    down = _train(model, opt, monitor, 300)
    assert monitor.sender.pending() <= FAST.queue_capacity
    assert monitor.sender.dropped_total > 0
    with _server(port) as (_, hd):
        _train(model, opt, monitor, 20)
        # Once healthd is back, the next heartbeats carry the client's drop count.
        _wait(lambda: _dropped_on_server(hd, "faults-down") == monitor.sender.dropped_total)
        monitor.close()
        assert _dropped_on_server(hd, "faults-down") == monitor.sender.dropped_total
        sent_steps = hd.store.jobs["faults-down"].ranks[0].steps_total
    assert sent_steps + monitor.sender.dropped_total >= 320 - FAST.queue_capacity
    print(f"\nstep time median: no monitor {statistics.median(baseline) * 1e3:.3f} ms, "
          f"healthd down {statistics.median(down) * 1e3:.3f} ms; dropped {monitor.sender.dropped_total}")


@pytest.mark.parametrize("mode", ["503", "slow"])
def test_5xx_or_slow_server_never_blocks_and_nothing_is_lost_unaccounted(mode: str) -> None:
    model, opt = _model()
    port = free_port()
    with _server(port) as (faulty, hd):
        faulty.mode = mode
        monitor = healthd_client.attach(model, opt, job=f"faults-{mode}", server=f"http://127.0.0.1:{port}",
                                        config=FAST)
        faulted = _train(model, opt, monitor, 150)
        assert faulty.faulted > 0
        assert monitor.sender.pending() <= FAST.queue_capacity
        faulty.mode = "ok"
        healthy = _train(model, opt, monitor, 50)
        t0 = time.perf_counter()
        monitor.close()
        close_seconds = time.perf_counter() - t0
        steps = hd.store.jobs[f"faults-{mode}"].ranks[0].steps_total
        s = monitor.sender
        # Every step report is either on the server or counted as dropped (none rejected).
        assert s.rejected_total == 0
        assert steps + s.dropped_total >= 200
        assert _dropped_on_server(hd, f"faults-{mode}") == s.dropped_total
    print(f"\n{mode}: step median {statistics.median(faulted) * 1e3:.3f} ms faulted vs "
          f"{statistics.median(healthy) * 1e3:.3f} ms healthy; close {close_seconds:.2f} s; "
          f"dropped {s.dropped_total}, on server {steps}")


def test_fork_in_dataloader_workers_sends_nothing_twice() -> None:
    model, opt = _model()
    port = free_port()
    data = torch.utils.data.TensorDataset(torch.randn(256, 16), torch.randn(256, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=32, num_workers=2,
                                         multiprocessing_context="fork")
    with _server(port) as (_, hd):
        monitor = healthd_client.attach(model, opt, job="faults-fork", server=f"http://127.0.0.1:{port}",
                                        config=FAST)
        n = 0
        for _ in range(3):
            for x, y in loader:  # each epoch forks two workers while the sender thread runs
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                monitor.step(loss=loss, batch_size=len(x))
                n += 1
        monitor.close()
        rank = hd.store.jobs["faults-fork"].ranks[0]
        assert rank.steps_total == n and monitor.sender.dropped_total == 0
        assert [s.step for s in rank.steps] == sorted({s.step for s in rank.steps})  # no duplicates


class _Broken(Quantity):
    name = "broken"

    def after_step(self, ctx) -> None:
        raise RuntimeError("measurement bug")


def test_a_failing_measurement_warns_once_and_training_goes_on() -> None:
    model, opt = _model()
    from healthd_client.transport import Transport

    class _Null(Transport):
        def send(self, body, headers):
            return 200, '{"accepted": 0}'

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = healthd_client.attach(model, opt, job="faults-q", transport=_Null(),
                                        extra_quantities=[_Broken()], config=FAST)
        _train(model, opt, monitor, 10)
        monitor.close()
    assert monitor.disabled_quantities == ["broken"]
    assert len([w for w in caught if "broken" in str(w.message)]) == 1

    model, opt = _model()
    strict = healthd_client.attach(model, opt, job="faults-q", transport=_Null(), extra_quantities=[_Broken()],
                                   config=FAST, strict=True)
    with pytest.raises(RuntimeError, match="measurement bug"):
        _train(model, opt, strict, 2)
    strict.close()


def test_attach_twice_returns_the_same_monitor_and_close_is_idempotent() -> None:
    model, opt = _model()
    from healthd_client.transport import Transport

    class _Null(Transport):
        def send(self, body, headers):
            return 200, '{"accepted": 0}'

    first = healthd_client.attach(model, opt, job="faults-twice", transport=_Null(), config=FAST)
    with pytest.warns(RuntimeWarning):
        second = healthd_client.attach(model, opt, job="faults-twice", transport=_Null(), config=FAST)
    assert second is first
    _train(model, opt, first, 3)
    first.close()
    first.close()
    assert first.closed
