import pytest
import torch

from tests.client.conftest import step_reports, train_steps


def test_lr_per_param_group_follows_the_scheduler(make_monitor, transport):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.SGD([
        {"params": model[0].parameters(), "lr": 0.1},
        {"params": model[1].parameters(), "lr": 0.01},
    ])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    monitor = make_monitor(model, optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        monitor.step()
        scheduler.step()
    monitor.close()
    reports = step_reports(transport)
    for step in range(3):
        assert reports[step]["lr"] == pytest.approx([0.1 * 0.5**step, 0.01 * 0.5**step])


def test_tensor_lr_is_read_from_the_packed_record(make_monitor, transport):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.003))
    monitor = make_monitor(model, optimizer)
    train_steps(model, optimizer, None, 0)
    optimizer.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    monitor.step()
    optimizer.param_groups[0]["lr"].fill_(1.0)  # in-place change after the step: not what it used
    monitor.close()
    assert step_reports(transport)[0]["lr"] == pytest.approx([0.003])
