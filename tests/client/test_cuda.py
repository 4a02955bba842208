"""The step path on CUDA: no host sync (under torch's sync debug mode), values still right.

Skipped without CUDA. Run on a GPU machine with ``pytest tests/client/test_cuda.py``.
"""

import math

import pytest
import torch

from tests.client.conftest import Net, step_reports

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_steps(model, optimizer, monitor, steps):
    for _ in range(steps):
        x = torch.randn(5, 4, device="cuda")
        y = torch.randint(0, 2, (5,), device="cuda")
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        monitor.step(loss=loss, batch_size=5)


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=torch.tensor(1e-3, device="cuda"), capturable=True),
])
def test_step_path_does_not_synchronize(make_monitor, transport, make_optimizer):
    torch.manual_seed(0)
    model = Net().cuda()
    optimizer = make_optimizer(model.parameters())
    monitor = make_monitor(model, optimizer, config_kwargs={"heavy_every_steps": 1})
    cuda_steps(model, optimizer, monitor, 1)  # the optimizer's own first-step setup may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_steps(model, optimizer, monitor, 5)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in model.parameters()))
    torch.cuda.synchronize()
    monitor.close()
    reports = step_reports(transport)
    assert sorted(reports) == list(range(6))
    last = reports[5]
    assert last["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert last["update_ratio"] > 0 and last["nonfinite"] == {"loss": 0, "grads": 0, "params": 0}
    lr = optimizer.param_groups[0]["lr"]
    assert last["lr"] == pytest.approx([float(lr)])


def test_model_moved_to_cuda_after_attach(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, config_kwargs={"heavy_every_steps": 1})
    model.cuda()
    cuda_steps(model, optimizer, monitor, 2)
    monitor.close()
    reports = step_reports(transport)
    assert sorted(reports) == [0, 1]
    assert all(r["update_ratio"] > 0 for r in reports.values())
