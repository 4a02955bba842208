"""StaleGrads in jobs with several models, optimizers and losses: another loss's gradients are not stale.

Each loop is real PyTorch with one monitor per optimizer (each under its own job,
with its own recording transport); the table says which monitor must report
stale gradients. A missing ``zero_grad`` is still seen from the first judged step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import healthd_client
from healthd_client import MonitorConfig
from tests.client.conftest import FAST, RecordingTransport, step_reports

STEPS = 6
F = torch.nn.functional


def _attach(model: nn.Module, optimizer: torch.optim.Optimizer, job: str) -> tuple[Any, RecordingTransport]:
    transport = RecordingTransport()
    monitor = healthd_client.attach(model, optimizer, job=job, transport=transport, strict=True,
                                    config=MonitorConfig(**FAST))
    return monitor, transport


def _mlp(n_in: int, n_out: int, out: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_out)]
    return nn.Sequential(*layers, *([out] if out is not None else []))


def gan(skip_zero: str = "", set_to_none: bool = True) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The DCGAN tutorial's loop: D on real and detached fake, then G's loss through D."""
    def build(mon: dict[str, Any]) -> dict[str, Any]:
        g, d = _mlp(4, 8, nn.Tanh()), _mlp(8, 1)
        opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
        mon["gen"], mon["disc"] = _attach(g, opt_g, "gen"), _attach(d, opt_d, "disc")
        bce = nn.BCEWithLogitsLoss()
        for _ in range(STEPS):
            real, z = torch.randn(16, 8), torch.randn(16, 4)
            if skip_zero != "disc":
                d.zero_grad(set_to_none=set_to_none)
            fake = g(z)
            loss_d = bce(d(real), torch.ones(16, 1)) + bce(d(fake.detach()), torch.zeros(16, 1))
            loss_d.backward()
            opt_d.step()
            mon["disc"][0].step(loss=loss_d, batch_size=16)
            if skip_zero != "gen":
                g.zero_grad(set_to_none=set_to_none)
            loss_g = bce(d(fake), torch.ones(16, 1))  # flows back through D: D's grads are not stale
            loss_g.backward()
            opt_g.step()
            mon["gen"][0].step(loss=loss_g, batch_size=16)
        return mon
    return build


def wgan_critic_x5(skip_zero: str = "") -> Callable[[dict[str, Any]], dict[str, Any]]:
    def build(mon: dict[str, Any]) -> dict[str, Any]:
        g, c = _mlp(4, 8), _mlp(8, 1)
        opt_g, opt_c = torch.optim.RMSprop(g.parameters(), 5e-5), torch.optim.RMSprop(c.parameters(), 5e-5)
        mon["gen"], mon["critic"] = _attach(g, opt_g, "gen"), _attach(c, opt_c, "critic")
        for _ in range(STEPS):
            for _ in range(5):
                if skip_zero != "critic":
                    opt_c.zero_grad()
                loss_c = c(g(torch.randn(16, 4)).detach()).mean() - c(torch.randn(16, 8)).mean()
                loss_c.backward()
                opt_c.step()
                mon["critic"][0].step(loss=loss_c)
            if skip_zero != "gen":
                opt_g.zero_grad()
            loss_g = -c(g(torch.randn(16, 4))).mean()
            loss_g.backward()
            opt_g.step()
            mon["gen"][0].step(loss=loss_g)
        return mon
    return build


def actor_critic_shared_trunk(skip_zero: str = "") -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Critic first (its loss flows into the trunk the actor's optimizer owns), then the actor."""
    def build(mon: dict[str, Any]) -> dict[str, Any]:
        trunk, actor, critic = _mlp(6, 8), nn.Linear(8, 3), nn.Linear(8, 1)
        opt_a = torch.optim.Adam([*trunk.parameters(), *actor.parameters()], 1e-3)
        opt_c = torch.optim.Adam(critic.parameters(), 1e-3)
        mon["actor"] = _attach(nn.ModuleDict({"trunk": trunk, "actor": actor}), opt_a, "actor")
        mon["critic"] = _attach(critic, opt_c, "critic")
        for _ in range(STEPS):
            obs, ret = torch.randn(16, 6), torch.randn(16, 1)
            if skip_zero != "critic":
                opt_c.zero_grad()
            loss_c = F.mse_loss(critic(trunk(obs)), ret)
            loss_c.backward()
            opt_c.step()
            mon["critic"][0].step(loss=loss_c)
            if skip_zero != "actor":
                opt_a.zero_grad()
            logp = F.log_softmax(actor(trunk(obs)), -1)[:, 0]
            loss_a = -(logp * (ret - critic(trunk(obs))).detach().squeeze(1)).mean()
            loss_a.backward()
            opt_a.step()
            mon["actor"][0].step(loss=loss_a)
        return mon
    return build


def distillation_frozen_teacher_and_ema(skip_zero: str = "") -> Callable[[dict[str, Any]], dict[str, Any]]:
    def build(mon: dict[str, Any]) -> dict[str, Any]:
        teacher, student = _mlp(8, 4), _mlp(8, 4)
        teacher.requires_grad_(False)
        ema = copy.deepcopy(student).requires_grad_(False)
        opt = torch.optim.SGD(student.parameters(), 0.1)
        mon["student"] = _attach(student, opt, "student")
        for _ in range(STEPS):
            x = torch.randn(16, 8)
            with torch.no_grad():
                target = F.softmax(teacher(x), -1)
            if skip_zero != "student":
                opt.zero_grad()
            loss = F.kl_div(F.log_softmax(student(x), -1), target, reduction="batchmean")
            loss.backward()
            opt.step()
            with torch.no_grad():
                for pe, ps in zip(ema.parameters(), student.parameters(), strict=True):
                    pe.lerp_(ps, 0.01)
            mon["student"][0].step(loss=loss)
        return mon
    return build


def accumulation_zero_after_step(skip_zero: str = "", set_to_none: bool = True) -> Callable[[dict[str, Any]], Any]:
    def build(mon: dict[str, Any]) -> dict[str, Any]:
        model = _mlp(8, 2)
        opt = torch.optim.SGD(model.parameters(), 0.1)
        mon["model"] = _attach(model, opt, "model")
        for _ in range(STEPS):
            for _ in range(4):
                F.cross_entropy(model(torch.randn(8, 8)), torch.randint(0, 2, (8,))).backward()
            opt.step()
            if skip_zero != "model":
                opt.zero_grad(set_to_none=set_to_none)
            mon["model"][0].step()
        return mon
    return build


CASES = {
    "gan": (gan(), set()),
    "gan zero_grad(set_to_none=False)": (gan(set_to_none=False), set()),
    "gan, D's zero_grad missing": (gan(skip_zero="disc"), {"disc"}),
    "gan, G's zero_grad missing": (gan(skip_zero="gen"), {"gen"}),
    "gan zeros, D's zero_grad missing": (gan(skip_zero="disc", set_to_none=False), {"disc"}),
    "wgan critic x5": (wgan_critic_x5(), set()),
    "wgan, critic's zero_grad missing": (wgan_critic_x5(skip_zero="critic"), {"critic"}),
    "wgan, generator's zero_grad missing": (wgan_critic_x5(skip_zero="gen"), {"gen"}),
    "actor-critic shared trunk": (actor_critic_shared_trunk(), set()),
    "actor-critic, actor's zero_grad missing": (actor_critic_shared_trunk(skip_zero="actor"), {"actor"}),
    "actor-critic, critic's zero_grad missing": (actor_critic_shared_trunk(skip_zero="critic"), {"critic"}),
    "distillation + EMA": (distillation_frozen_teacher_and_ema(), set()),
    "distillation, zero_grad missing": (distillation_frozen_teacher_and_ema(skip_zero="student"), {"student"}),
    "accumulation x4, zero after step": (accumulation_zero_after_step(), set()),
    "accumulation x4, zeros after step": (accumulation_zero_after_step(set_to_none=False), set()),
    "accumulation x4, zero_grad missing": (accumulation_zero_after_step(skip_zero="model"), {"model"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stale_only_where_zero_grad_is_missing(name: str) -> None:
    torch.manual_seed(0)
    build, expected_stale = CASES[name]
    monitors: dict[str, Any] = {}
    try:
        build(monitors)
    finally:
        for monitor, _ in monitors.values():
            monitor.close(timeout=5.0)
    for job, (_, transport) in monitors.items():
        reports = step_reports(transport)
        flags = [reports[s].get("grads_stale_at_backward") for s in sorted(reports)]
        assert flags[0] is None, (job, flags)  # the first step has no previous step to compare with
        judged = flags[1:]
        assert all(f is not None for f in judged), (job, flags)
        if job in expected_stale:
            assert all(judged), (job, flags)  # from the first judged step on: MissingZeroGrad fires by step 3
        else:
            assert not any(judged), (job, flags)
