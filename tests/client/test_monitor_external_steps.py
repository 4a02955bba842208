"""Monitor.open_steps_externally / before_optimizer_step: steps opened by a framework hook, not the pre-hook.

The case it exists for: ``optimizer.step(closure)`` where the closure runs
forward and backward (Lightning), so the optimizer's step pre-hook fires before
the gradients exist.
"""

from __future__ import annotations

from typing import Any

import torch

from tests.client.conftest import Net, RecordingTransport, step_reports


def _closure_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, monitor: Any, steps: int,
                   external: bool) -> None:
    for _ in range(steps):
        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 2, (5,)))
            loss.backward()
            if external:
                monitor.before_optimizer_step()  # where Lightning calls on_before_optimizer_step
            return loss

        loss = optimizer.step(closure)
        monitor.step(loss=loss, batch_size=5)


def test_steps_opened_after_backward_see_this_steps_gradients(make_monitor: Any,
                                                              transport: RecordingTransport) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    monitor.open_steps_externally()
    _closure_steps(model, optimizer, monitor, 3, external=True)
    monitor.close(timeout=5.0)
    steps = step_reports(transport)
    assert sorted(steps) == [0, 1, 2]  # one record per step: the pre-hook no longer opens one
    assert all(s["grad_norm"] > 0 and s["loss"] > 0 for s in steps.values())
    assert not any(v.get("grad_missing") for v in steps[0]["layers"].values())


def test_without_it_the_pre_hook_sees_no_gradients_at_step_0(make_monitor: Any,
                                                             transport: RecordingTransport) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    _closure_steps(model, optimizer, monitor, 2, external=False)
    monitor.close(timeout=5.0)
    steps = step_reports(transport)
    assert "grad_norm" not in steps[0] and all(v.get("grad_missing") for v in steps[0]["layers"].values())
