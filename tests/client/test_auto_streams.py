"""healthd_client.auto with several optimizers in one process (a stream each) and under torch.amp.GradScaler
(the true loss, not the scaled one). Real tiny GANs, in this process, under auto-attach."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import healthd_client
from healthd_client import MonitorConfig, auto
from tests.client.conftest import FAST, RecordingTransport
from tests.client.test_auto import armed, transport
from tests.integration.auto_gan_train import Discriminator, Generator  # the GAN the subprocess test runs
from tests.integration.servers import wait_until
from tests.live import live_healthd

__all__ = ["armed", "transport"]  # auto-attach armed in this process, as tests/client/test_auto.py arms it

BATCH = 16


def gan(steps: int, *, critic_steps: int = 1, skip_d_zero_grad: bool = False) -> dict[str, list[float]]:
    """The tutorial's alternating GAN (the discriminator steps first); returns each side's losses as computed."""
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 2e-4), torch.optim.Adam(d.parameters(), 2e-4)
    bce = nn.BCEWithLogitsLoss()
    seen: dict[str, list[float]] = {"generator": [], "discriminator": []}
    for _ in range(steps):
        for _ in range(critic_steps):
            real, z = torch.randn(BATCH, 8) * 0.5 + 1.0, torch.randn(BATCH, 4)
            if not skip_d_zero_grad:
                opt_d.zero_grad()
            fake = g(z)
            loss_d = bce(d(real), torch.ones(BATCH, 1)) + bce(d(fake.detach()), torch.zeros(BATCH, 1))
            loss_d.backward()
            opt_d.step()
            seen["discriminator"].append(loss_d.item())
        opt_g.zero_grad()
        loss_g = bce(d(fake), torch.ones(BATCH, 1))
        loss_g.backward()
        opt_g.step()
        seen["generator"].append(loss_g.item())
    return seen


def by_stream(transport: RecordingTransport) -> dict[str | None, list[dict[str, Any]]]:
    steps: dict[str | None, list[dict[str, Any]]] = {}
    for s in transport.of_kind("step"):
        steps.setdefault(s.get("stream"), []).append(s)
    return steps


def test_an_alternating_gan_reports_one_stream_per_optimizer(armed: auto.AutoAttach,
                                                            transport: RecordingTransport) -> None:
    seen = gan(6)
    # The generator ran before the discriminator's first step: both streams are named, after their classes.
    assert list(armed.monitors) == ["discriminator", "generator"]
    assert isinstance(armed.monitors["generator"]._model, Generator)
    assert isinstance(armed.monitors["discriminator"]._model, Discriminator)
    armed.close()
    steps = by_stream(transport)
    assert set(steps) == {"generator", "discriminator"}
    for name in ("generator", "discriminator"):  # each its own step count and its own loss
        assert [s["step"] for s in steps[name]] == list(range(6))
        assert [s["loss"] for s in steps[name]] == pytest.approx(seen[name])
    assert all(s["batch_size"] == BATCH for s in steps["generator"])


def test_a_critic_stepping_5_times_per_generator_step_counts_its_own_steps(armed: auto.AutoAttach,
                                                                          transport: RecordingTransport) -> None:
    seen = gan(3, critic_steps=5)
    armed.close()
    steps = by_stream(transport)
    assert [s["step"] for s in steps["discriminator"]] == list(range(15))
    assert [s["step"] for s in steps["generator"]] == list(range(3))
    assert [s["loss"] for s in steps["discriminator"]] == pytest.approx(seen["discriminator"])
    assert [s["loss"] for s in steps["generator"]] == pytest.approx(seen["generator"])


def test_two_optimizers_after_one_backward_both_report_that_loss(armed: auto.AutoAttach,
                                                                 transport: RecordingTransport) -> None:
    torch.manual_seed(0)
    actor, critic = nn.Linear(4, 2), nn.Linear(4, 1)
    opt_a, opt_c = torch.optim.SGD(actor.parameters(), 1e-3), torch.optim.SGD(critic.parameters(), 1e-3)
    seen = []
    for _ in range(4):
        x = torch.randn(8, 4)
        loss = actor(x).pow(2).mean() + critic(x).pow(2).mean()  # a shared loss, one backward
        opt_a.zero_grad()
        opt_c.zero_grad()
        loss.backward()
        opt_a.step()
        opt_c.step()
        seen.append(loss.item())
    assert list(armed.monitors) == ["optimizer_0", "optimizer_1"]  # torch's Linear names no role
    armed.close()
    for steps in by_stream(transport).values():
        assert [s["loss"] for s in steps] == pytest.approx(seen)


def test_an_explicit_attach_wins_and_leaves_the_other_optimizer_alone(armed: auto.AutoAttach,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    opt_g, opt_d = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
    mine = RecordingTransport()
    explicit = healthd_client.attach(g, opt_g, "mine", stream="generator", transport=mine,
                                     config=MonitorConfig(**FAST))
    with caplog.at_level(logging.WARNING, logger="healthd_client.auto"):
        for _ in range(3):
            fake = g(torch.randn(4, 4))
            opt_d.zero_grad()
            d(fake.detach()).mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            d(fake).mean().backward()
            opt_g.step()
    explicit.close()
    assert armed.done and armed.monitors == {}
    assert {r.get("stream") for r in mine.of_kind("step")} == {"generator"}
    assert sum("attaches healthd itself" in r.message for r in caplog.records) <= 1


def test_no_more_streams_than_healthd_accepts(armed: auto.AutoAttach, caplog: pytest.LogCaptureFixture) -> None:
    models = [nn.Linear(2, 1) for _ in range(auto.MAX_STREAMS + 2)]
    opts = [torch.optim.SGD(m.parameters(), 1e-3) for m in models]
    with caplog.at_level(logging.WARNING, logger="healthd_client.auto"):
        for _ in range(2):
            for m, o in zip(models, opts, strict=True):
                o.zero_grad()
                m(torch.randn(3, 2)).sum().backward()
                o.step()
    assert len(armed.monitors) == auto.MAX_STREAMS and not armed.failed
    assert sum("at most 8 optimizers" in r.message for r in caplog.records) == 1


def test_the_gpu_is_sampled_by_one_stream_only(armed: auto.AutoAttach) -> None:
    gan(2)
    sampling = [name for name, m in armed.monitors.items() if any(q.name == "gpu" for q in m.quantities)]
    assert len(sampling) == 1


def test_a_missing_discriminator_zero_grad_is_critical_on_that_stream_within_3_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with live_healthd() as live:
        monkeypatch.setenv("HEALTHD_SERVER", live.url)
        monkeypatch.setenv("HEALTHD_JOB", "auto-gan")
        a = auto.AutoAttach(config=MonitorConfig(**FAST))
        a.install()
        try:
            gan(12, skip_d_zero_grad=True)
        finally:
            a.remove()
            for m in a.monitors.values():
                m.close(timeout=10.0)

        def settled() -> bool:
            streams = httpx.get(f"{live.url}/v1/jobs/auto-gan", timeout=10).json().get("streams", {})
            return all(streams.get(s, {}).get("last_step") == 11 for s in ("generator", "discriminator")) and \
                "healthd_rank_evaluations_pending 0.0" in httpx.get(f"{live.url}/metrics", timeout=10).text

        wait_until(settled, timeout_seconds=60)
        alerts = httpx.get(f"{live.url}/v1/alerts", params={"job": "auto-gan"}, timeout=10).json()["alerts"]
        mzg = [a for a in alerts if a["rule"] == "MissingZeroGrad"]
        assert [(a["stream"], a["severity"]) for a in mzg] == [("discriminator", "critical")], alerts
        assert mzg[0]["step"] is not None and mzg[0]["step"] <= 3, mzg


# ---------------------------------------------------------------------- GradScaler


class Recording(TorchFunctionMode):
    """Every torch function called while pushed."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# What copies a device value to the host (a GPU->CPU sync on CUDA).
HOST_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy", "_local_scalar_dense"}


def test_under_grad_scaler_the_reported_loss_is_the_true_one_and_no_sync_is_added(
        armed: auto.AutoAttach, transport: RecordingTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    scaler = torch.amp.GradScaler("cpu")
    assert scaler.is_enabled()
    recorded: list[list[str]] = []
    original = armed._step_loss

    def step_loss_recorded(watch: Any) -> Any:
        with Recording() as mode:
            loss = original(watch)
        recorded.append(mode.calls)
        return loss

    monkeypatch.setattr(armed, "_step_loss", step_loss_recorded)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    for _ in range(5):
        x = torch.randn(BATCH, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), x.sum(1, keepdim=True))  # a plain function's loss
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        seen.append(loss.item())
    assert armed.monitor is not None
    armed.close()
    steps = transport.of_kind("step")
    assert [s["step"] for s in steps] == list(range(5))
    assert [s["loss"] for s in steps] == pytest.approx(seen, rel=1e-5)  # not seen * 65536
    assert recorded and all(calls and not HOST_READS & set(calls) for calls in recorded), recorded


def test_without_grad_scaler_step_the_loss_is_what_backward_is_called_on(armed: auto.AutoAttach,
                                                                          transport: RecordingTransport) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    for _ in range(3):
        x = torch.randn(8, 4)
        loss = (model(x) - 1).pow(2).mean() * 0.5  # a user's own factor is part of the loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    armed.close()
    assert [s["loss"] for s in transport.of_kind("step")] == pytest.approx(seen)


def attach_calls(train: Callable[[], object]) -> list[dict[str, Any]]:
    """The keyword arguments auto-attach passes to ``attach`` while ``train`` runs (reports recorded, not sent)."""
    recording = RecordingTransport()
    calls: list[dict[str, Any]] = []

    def recording_attach(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return healthd_client.attach(*args, transport=recording, **kwargs)

    a = auto.AutoAttach(attach=recording_attach, config=MonitorConfig(**FAST))
    a.install()
    try:
        train()
    finally:
        a.close()
    return calls


def test_auto_attach_passes_each_stream_to_attach_under_one_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHD_SERVER", "http://unused")
    monkeypatch.setenv("HEALTHD_JOB", "auto-unit")
    calls = attach_calls(lambda: gan(2))
    assert [c.get("stream") for c in calls] == ["discriminator", "generator"]
    assert all(c["job"] == "auto-unit" for c in calls)
    # Two players against each other: neither loss is judged by "should go down" (HEALTHD_LOSS_KIND unset).
    assert [c.get("loss_kind") for c in calls] == ["adversarial", "adversarial"]


@pytest.mark.parametrize(("value", "kind"), [(None, "adversarial"), ("minimized", "minimized"),
                                             (" Adversarial ", "adversarial"), ("bogus", "adversarial")])
def test_several_models_loss_kind_from_the_environment(value: str | None, kind: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    environ = {} if value is None else {"HEALTHD_LOSS_KIND": value}
    with caplog.at_level(logging.WARNING, logger="healthd_client"):
        assert auto.several_models_loss_kind(environ) == kind
    assert ("HEALTHD_LOSS_KIND" in caplog.text) == (value == "bogus")


def test_a_single_optimizer_job_sends_no_loss_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHD_SERVER", "http://unused")

    def train() -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), 0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
            opt.step()

    calls = attach_calls(train)
    assert len(calls) == 1 and "stream" not in calls[0] and "loss_kind" not in calls[0]


def test_an_optimizer_of_no_module_is_left_alone_and_the_others_go_on(armed: auto.AutoAttach,
                                                                       transport: RecordingTransport,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    actor = nn.Linear(4, 2)
    log_alpha = nn.Parameter(torch.zeros(()))  # SAC's learned temperature: a parameter of no module
    opt_actor, opt_alpha = torch.optim.Adam(actor.parameters()), torch.optim.Adam([log_alpha])
    with caplog.at_level(logging.WARNING, logger="healthd_client.auto"):
        for _ in range(4):
            opt_actor.zero_grad()
            actor(torch.randn(8, 4)).pow(2).mean().backward()
            opt_actor.step()
            opt_alpha.zero_grad()
            (log_alpha.exp() * 0.1).backward()
            opt_alpha.step()
    assert not armed.failed and list(armed.monitors) == [None]
    assert sum("is not monitored" in r.message for r in caplog.records) == 1
    armed.close()
    assert [s["step"] for s in transport.of_kind("step")] == [0, 1, 2, 3]


@pytest.mark.parametrize(("model", "index", "taken", "name"), [
    (Generator(), 1, set(), "generator"),
    (torch.compile(Generator()), 1, set(), "generator"),  # the compiled wrapper names its model
    (nn.Sequential(), 1, set(), "optimizer_1"),  # torch's own classes name no role
    (Generator(), 2, {"generator"}, "optimizer_2"),  # unique within the process
    (nn.Linear(1, 1), 1, {"optimizer_1"}, "optimizer_2"),
])
def test_stream_names(model: nn.Module, index: int, taken: set[str | None], name: str) -> None:
    assert auto.stream_name(model, index, taken) == name
    assert auto.snake_case("GANDiscriminator") == "gan_discriminator"
