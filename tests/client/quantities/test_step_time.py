import torch

from tests.client.conftest import step_reports, train_steps


def test_step_seconds_between_monitor_steps(make_monitor, transport):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    train_steps(model, optimizer, monitor, 3)
    optimizer.step()  # the user forgot monitor.step(): closed by the next pre-hook, no timing
    train_steps(model, optimizer, monitor, 1)
    monitor.close()
    reports = step_reports(transport)
    assert "step_seconds" not in reports[0]
    assert reports[1]["step_seconds"] >= 0 and reports[2]["step_seconds"] >= 0
    assert "step_seconds" not in reports[3]
    assert reports[4]["step_seconds"] >= 0
