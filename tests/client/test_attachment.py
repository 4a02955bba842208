"""attach() with optimizers that are not torch.optim.Optimizer: refused at attach, with what to pass instead."""

from __future__ import annotations

import pytest
import torch

import healthd_client
from tests.client.conftest import FAST, Net, RecordingTransport, step_reports, train_steps


class DuckSGD:
    """A custom optimizer class that does not derive from torch.optim.Optimizer (no step hooks)."""

    def __init__(self, params, lr: float) -> None:
        self.param_groups = [{"params": list(params), "lr": lr}]

    def zero_grad(self) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.param_groups[0]["lr"])


class ManualSGD(torch.optim.Optimizer):
    """The documented way: the same manual update, as a torch.optim.Optimizer subclass."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize("optimizer", [None, "duck"], ids=["manual-loop", "duck-typed-class"])
def test_an_optimizer_without_step_hooks_is_refused_at_attach(optimizer):
    model = Net()
    opt = DuckSGD(model.parameters(), lr=0.1) if optimizer == "duck" else None
    with pytest.raises(ValueError, match=r"torch\.optim\.Optimizer.*derive it from torch\.optim\.Optimizer"):
        healthd_client.attach(model, opt, job="j", transport=RecordingTransport())


def test_a_manual_update_as_an_optimizer_subclass_is_measured():
    transport = RecordingTransport()
    model = Net()
    optimizer = ManualSGD(model.parameters(), lr=0.1)
    monitor = healthd_client.attach(model, optimizer, job="j", transport=transport,
                                    config=healthd_client.MonitorConfig(**FAST), strict=True)
    train_steps(model, optimizer, monitor, 3)
    monitor.close()
    steps = step_reports(transport)
    assert sorted(steps) == [0, 1, 2]
    assert steps[0]["update_ratio"] > 0
