"""Inputs measures the data, not another model's output: forwards on tensors with a grad_fn are passed over."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.client.conftest import step_reports

F = nn.functional


def _gan_steps(make_monitor: Any, fake_first: bool) -> None:
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    d = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt_g, opt_d = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
    monitor = make_monitor(d, opt_d)
    for _ in range(3):
        real = torch.randn(32, 8) * 3.0 + 10.0  # the data: mean ~10, std ~3
        fake = g(torch.randn(32, 4))
        opt_g.zero_grad()
        if fake_first:  # the generator's pass through D comes first in the step (grad_fn: skipped)
            F.softplus(-d(fake)).mean().backward()
            opt_g.step()
        opt_d.zero_grad()
        (F.softplus(-d(real)).mean() + F.softplus(d(fake.detach())).mean()).backward()
        opt_d.step()
        monitor.step()
        if not fake_first:
            opt_g.zero_grad()
            F.softplus(-d(fake)).mean().backward()  # after D's step: the next step's first forward
            opt_g.step()
    monitor.close()


@pytest.mark.parametrize("fake_first", [False, True])
def test_the_discriminator_sees_the_real_batch(make_monitor, transport, fake_first: bool) -> None:
    _gan_steps(make_monitor, fake_first)
    reports = step_reports(transport)
    for step in range(3):
        inputs = reports[step]["inputs"]
        assert inputs["mean"] == pytest.approx(10.0, abs=1.5), (step, inputs)
        assert inputs["std"] == pytest.approx(3.0, abs=1.0), (step, inputs)


def test_a_model_fed_only_by_another_model_reports_no_inputs(make_monitor, transport) -> None:
    torch.manual_seed(0)
    encoder, head = nn.Linear(8, 8), nn.Linear(8, 2)
    opt = torch.optim.SGD(head.parameters(), 0.1)
    monitor = make_monitor(head, opt)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(head(encoder(torch.randn(16, 8))), torch.randint(0, 2, (16,))).backward()
        opt.step()
        monitor.step()
    monitor.close()
    assert all("inputs" not in r for r in step_reports(transport).values())
