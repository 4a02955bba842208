import math

import pytest
import torch

from tests.client.conftest import step_reports


@pytest.mark.parametrize("loss, expected", [
    (torch.tensor(2.5), 2.5),
    (torch.tensor([2.5]), 2.5),
    (torch.tensor([1.0, 3.0]), 2.0),  # a non-scalar loss is averaged
    (2.5, 2.5),
    (torch.tensor(2.5, dtype=torch.bfloat16), 2.5),
    (float("inf"), math.inf),
])
def test_loss_values(make_monitor, transport, loss, expected):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    monitor.step(loss=loss)
    monitor.close()
    report = step_reports(transport)[0]
    assert report["loss"] == pytest.approx(expected)
    assert report["nonfinite"]["loss"] == (0 if math.isfinite(expected) else 1)


def test_no_loss_no_loss_field(make_monitor, transport):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    monitor.step()
    monitor.close()
    report = step_reports(transport)[0]
    assert "loss" not in report
    assert "loss" not in report.get("nonfinite", {})
