from __future__ import annotations

from typing import Any

import pytest
import torch

from healthd_client.quantities.loss_scale import LossScale
from tests.client.conftest import RecordingTransport, step_reports


def test_scale_and_skipped_steps_without_sync(make_monitor: Any, transport: RecordingTransport) -> None:
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    monitor = make_monitor(model, opt, extra_quantities=[LossScale(scaler)])
    for step in range(4):
        opt.zero_grad()
        loss = model(torch.randn(4, 3)).square().mean()
        if step in (1, 2):
            loss = loss * float("inf")  # overflowing gradients: GradScaler skips optimizer.step()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        monitor.step(loss=loss, batch_size=4)
    monitor.close()
    reports = step_reports(transport)
    assert [reports[i]["step_skipped"] for i in range(4)] == [False, True, True, False]
    assert [reports[i]["loss_scale"] for i in range(4)] == [1024.0, 512.0, 256.0, 256.0]


def test_rejects_what_is_not_a_scaler() -> None:
    with pytest.raises(ValueError, match="GradScaler"):
        LossScale(object())
