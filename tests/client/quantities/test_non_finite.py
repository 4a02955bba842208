import math

import pytest
import torch

from tests.client.conftest import Net, step_reports, validate


def test_param_norm_per_layer_matches_naive(make_monitor, transport):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    optimizer.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    monitor.step()
    expected = {
        name or "root": math.sqrt(sum(float(p.detach().double().norm()) ** 2 for p in m.parameters(recurse=False)))
        for name, m in model.named_modules()
        if list(m.parameters(recurse=False))
    }
    monitor.close()
    report = step_reports(transport)[0]
    for name, norm in expected.items():
        assert report["layers"][name]["param_norm"] == pytest.approx(norm, rel=1e-6)
    assert report["nonfinite"]["params"] == 0


def test_non_finite_params_counts_tensors_not_elements(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    optimizer.zero_grad()
    out = model(torch.randn(5, 4)).sum()
    out.backward()
    model.head.weight.grad.fill_(float("nan"))  # every element of one tensor turns NaN
    optimizer.step()
    monitor.step(loss=out)
    monitor.close()
    validate(transport.bodies[-1])
    report = step_reports(transport)[0]
    assert report["nonfinite"] == {"loss": 0, "grads": 1, "params": 1}
    assert math.isnan(report["layers"]["head"]["param_norm"])


def test_nan_loss_is_counted_and_reported(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    optimizer.zero_grad()
    loss = model(torch.randn(5, 4)).sum() * float("nan")
    loss.backward()
    optimizer.step()
    monitor.step(loss=loss)
    monitor.close()
    # The closing heartbeat may travel in a body of its own: look at every body.
    step = next(r for body in transport.bodies for r in validate(body).reports if r.kind == "step")
    assert math.isnan(step.loss)
    assert step.nonfinite.loss == 1
    assert step.nonfinite.grads == 7  # every parameter tensor's grad is NaN
    assert step.nonfinite.params == 7


@pytest.mark.parametrize("seed", range(5))
def test_non_finite_counts_match_naive(make_monitor, transport, seed):
    # Random elements of random tensors turn NaN/Inf in the gradients; SGD carries them into the parameters.
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    optimizer.zero_grad()
    loss = model(torch.randn(5, 4)).sum()
    loss.backward()
    for p in model.parameters():
        if torch.rand((), generator=gen) < 0.4:
            flat = p.grad.view(-1)
            k = int(torch.randint(1, flat.numel() + 1, (), generator=gen))
            flat[torch.randperm(flat.numel(), generator=gen)[:k]] = float(["nan", "inf", "-inf"][seed % 3])
    naive_grads = sum(not bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    optimizer.step()
    monitor.step(loss=loss)
    naive_params = sum(not bool(torch.isfinite(p).all()) for p in model.parameters())
    monitor.close()
    report = step_reports(transport)[0]
    assert report["nonfinite"] == {"loss": 0, "grads": naive_grads, "params": naive_params}
