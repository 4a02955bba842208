"""StaleGrads against a naive reference: was any ``.grad`` already non-zero when the step's backward began?"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.client.conftest import Net, RecordingTransport, step_reports


def naive_stale(model: torch.nn.Module) -> bool:
    return any(p.grad is not None and bool((p.grad != 0).any()) for p in model.parameters())


@pytest.mark.parametrize("zero_grad", ["none", "zeros", "forgotten", "accumulate"])
def test_stale_grads_match_naive(make_monitor: Any, transport: RecordingTransport, zero_grad: str) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = make_monitor(model, optimizer)
    expected = []
    for _ in range(4):
        if zero_grad in ("none", "accumulate"):
            optimizer.zero_grad(set_to_none=True)
        elif zero_grad == "zeros":
            optimizer.zero_grad(set_to_none=False)
        expected.append(naive_stale(model))  # as the step's first backward begins
        for _ in range(2 if zero_grad == "accumulate" else 1):  # micro-batches add to their own step's grads
            model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        monitor.step()
    monitor.close()
    reports = step_reports(transport)
    # Armed by an optimizer step: the first backward of step 0 has no step before it to be left over from.
    assert "grads_stale_at_backward" not in reports[0]
    assert [reports[s]["grads_stale_at_backward"] for s in range(1, 4)] == expected[1:]
    assert expected[1:] == ([True] * 3 if zero_grad == "forgotten" else [False] * 3)


@pytest.mark.parametrize("zero_grad", ["none", "forgotten"])
def test_attached_after_a_backward_judges_the_next_step(make_monitor: Any, transport: RecordingTransport,
                                                        zero_grad: str) -> None:
    """Auto-attach attaches in the first step's pre-hook, after its backward: the gradients already there
    are ones the parameters had, so ``zero_grad()`` setting them to None is a reset (not a first gradient)."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    monitor = make_monitor(model, optimizer)
    optimizer.step()
    monitor.step()
    for _ in range(2):
        if zero_grad == "none":
            optimizer.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        monitor.step()
    monitor.close()
    reports = step_reports(transport)
    assert [reports[s]["grads_stale_at_backward"] for s in (1, 2)] == [zero_grad == "forgotten"] * 2
