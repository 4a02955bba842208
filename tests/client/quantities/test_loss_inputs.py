"""LossInputs in eager mode: softmax before cross_entropy and broadcasting shapes are seen on sampled steps."""

from __future__ import annotations

import math

import pytest
import torch

import healthd_client
from healthd_client.quantities.loss_inputs import inspect_loss_call
from tests.client.conftest import FAST, RecordingTransport, step_reports


def run(loss_fn, steps=2):
    others = len(torch.nn.modules.module._global_forward_pre_hooks)
    transport = RecordingTransport()
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = healthd_client.MonitorConfig(**FAST, inspect_every_steps=1, inspect_first_steps=1)
    monitor = healthd_client.attach(model, optimizer, job="j", transport=transport, config=config, strict=True)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(torch.randn(6, 4)))
        loss.backward()
        optimizer.step()
        monitor.step(loss=loss)
    monitor.close()
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == others
    return step_reports(transport)


def test_softmax_before_cross_entropy_is_seen():
    y = torch.randint(0, 3, (6,))
    steps = run(lambda out: torch.nn.CrossEntropyLoss()(out.softmax(1), y))
    for report in steps.values():
        (call,) = report["loss_inputs"]
        assert call["fn"] == "cross_entropy"
        assert call["rows_sum_to_one"] and call["all_non_negative"]


def test_logits_are_not_flagged():
    y = torch.randint(0, 3, (6,))
    steps = run(lambda out: torch.nn.functional.cross_entropy(out, y))
    assert not steps[0]["loss_inputs"][0]["rows_sum_to_one"]


def test_broadcasting_target_is_seen():
    steps = run(lambda out: torch.nn.functional.mse_loss(out[:, :1], torch.randn(6)))
    assert steps[0]["loss_inputs"][0]["broadcasts"] is True


def naive_flags(fn: str, x: torch.Tensor) -> list[bool]:
    """min >= 0, max <= 0, and every row over the class dim (1, or 0 unbatched) sums to 1 within 1e-3 (nll: its
    exp), one Python sum per row."""
    values = x.double()
    rows = [values.tolist()] if values.dim() == 1 else values.movedim(1, -1).reshape(-1, values.shape[1]).tolist()
    flat = [v for row in rows for v in row]
    row_sums = [sum(math.exp(v) if fn == "nll_loss" else v for v in row) for row in rows]
    return [min(flat) >= 0, max(flat) <= 0, all(abs(s - 1) < 1e-3 for s in row_sums)]


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("make", [
    lambda: torch.randn(6, 3),  # logits
    lambda: torch.randn(6, 3).softmax(1),  # probabilities
    lambda: torch.randn(6, 3).log_softmax(1),  # log-probabilities
    lambda: torch.randn(4, 5, 7).softmax(1),  # (N, C, d): the class dim is 1
    lambda: torch.randn(5).softmax(0),  # unbatched
    lambda: torch.rand(6, 3),  # non-negative, not normalised
])
def test_loss_input_flags_match_naive(fn, make):
    torch.manual_seed(0)
    x = make()
    target = torch.zeros(x.shape[0] if x.dim() > 1 else (), dtype=torch.long)
    seen = inspect_loss_call(getattr(torch.nn.functional, fn), x, target)
    assert seen is not None
    assert [bool(v) for v in seen[1]["flags"]] == naive_flags(fn, x)
