"""Issue 2's promise end to end: a real CPU training loop with a real fault -> healthd_client -> a real
healthd over HTTP -> an alert in /v1/alerts and on /metrics. Healthy runs stay quiet (nothing above info)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import torch

import healthd_client
from healthd.tools.demo import run_demo
from tests.live import LiveHealthd, live_healthd

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[LiveHealthd]:
    with live_healthd() as live:
        yield live


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 20, generator=g)
    y = (x @ torch.randn(20, 5, generator=g)).argmax(1)
    return x, y


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 5))


def train(server: LiveHealthd, job: str, steps: int, *, make_opt: Callable[[torch.nn.Module], torch.optim.Optimizer],
          sched: Callable[[torch.optim.Optimizer], object] | None = None,
          fault: Callable[[int, torch.Tensor, torch.optim.Optimizer], torch.Tensor] | None = None) -> list[dict]:
    torch.manual_seed(0)
    model = _mlp()
    opt = make_opt(model)
    scheduler = sched(opt) if sched else None
    x, y = _data()
    loss_fn = torch.nn.CrossEntropyLoss()
    with healthd_client.attach(model, opt, job=job, server=server.url, num_classes=5, dataset_size=len(x)) as mon:
        for step in range(steps):
            i = (step * 32) % (len(x) - 32)
            xb, yb = x[i:i + 32], y[i:i + 32]
            if fault is not None:
                xb = fault(step, xb, opt)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()  # type: ignore[attr-defined]
            mon.step(loss=loss, batch_size=len(xb))
    return _alerts_after_flush(server, job, steps)


def _alerts_after_flush(server: LiveHealthd, job: str, steps: int) -> list[dict]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        info = server.get(f"/v1/jobs/{job}")
        # A read answers from the state as it is: wait until no rank's steps wait for their rules too.
        if (info.status_code == 200 and info.json()["last_step"] == steps - 1
                and server.get("/healthz").json()["rank_evaluations_pending"] == 0):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"healthd never saw and evaluated the last step of {job}")
    alerts = server.get("/v1/alerts", params={"job": job}).json()["alerts"]
    return [a for a in alerts if a["state"] != "pending"]


def test_lr_too_high_is_caught_within_50_steps(server: LiveHealthd) -> None:
    onset = 40

    def fault(step: int, xb: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
        if step == onset:
            for g in opt.param_groups:
                g["lr"] *= 300
        return xb

    alerts = train(server, "e2e-lr", 120, make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                   fault=fault)
    caught = [a for a in alerts if a["rule"] in {"LearningRateTooHigh", "LossDiverging", "ExplodingGradients"}]
    assert caught, alerts
    first = min(a["step"] for a in caught)
    assert onset <= first <= onset + 50
    for a in caught:
        assert a["evidence"] and a["advice"] and a["summary"] and a["rank"] == 0


def test_nan_is_caught_at_the_step_it_appears(server: LiveHealthd) -> None:
    onset = 30

    def fault(step: int, xb: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
        if step == onset:
            xb = xb.clone()
            xb[0, 0] = math.nan
        return xb

    alerts = train(server, "e2e-nan", 60, make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), fault=fault)
    (nf,) = [a for a in alerts if a["rule"] == "NonFiniteValues"]
    assert nf["step"] == onset and nf["severity"] == "critical"
    assert math.isnan(nf["evidence"]["loss"])
    metrics = server.get("/metrics").text
    alert = 'trainhealth_alert{job="e2e-nan",rank="0",rule="NonFiniteValues",severity="critical",stream=""} 1.0'
    assert alert in metrics


@pytest.mark.parametrize("name", ["adam", "sgd-warmup-cosine"])
def test_healthy_runs_raise_nothing_above_info(server: LiveHealthd, name: str) -> None:
    steps = 300
    if name == "adam":
        alerts = train(server, "e2e-adam", steps, make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    else:
        def sched(opt: torch.optim.Optimizer) -> object:
            warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=30)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - 30)
            return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[30])

        alerts = train(server, "e2e-sgd", steps,
                       make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
                       sched=sched)
    loud = [(a["rule"], a["severity"], a["summary"]) for a in alerts if a["severity"] != "info"]
    assert loud == []


def test_series_reach_metrics(server: LiveHealthd) -> None:
    train(server, "e2e-metrics", 20, make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("trainhealth_loss", "trainhealth_grad_norm", "trainhealth_update_ratio", "trainhealth_learning_rate",
                 "trainhealth_step_seconds", "trainhealth_layer_grad_norm", "trainhealth_layer_update_ratio"):
        assert f'{name}{{job="e2e-metrics"' in text, name
    assert 'trainhealth_step{job="e2e-metrics",rank="0",stream=""} 19.0' in text


def test_demo_catches_its_fault() -> None:
    lines: list[str] = []
    assert run_demo("nan", steps=100, live=False, step_sleep_seconds=0.0, out=lines.append) == 0
    assert any("Caught: NonFiniteValues at step 80" in line for line in lines)
