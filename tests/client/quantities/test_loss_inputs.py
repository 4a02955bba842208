"""LossInputs in eager mode: softmax before cross_entropy and broadcasting shapes are seen on sampled steps."""

from __future__ import annotations

import torch

import healthd_client
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
