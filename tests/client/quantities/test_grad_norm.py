import math

import pytest
import torch

from tests.client.conftest import Net, step_reports, train_steps, validate


def naive_layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    out = {}
    for name, module in model.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            out[name or "root"] = math.sqrt(sum(float(g.double().norm()) ** 2 for g in grads))
    return out


def test_per_layer_and_global_grad_norm_match_naive(make_monitor, transport):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    expected = []
    for _ in range(3):
        train_steps(model, optimizer, monitor, 1)
        expected.append(naive_layer_grad_norms(model))  # SGD leaves the grads as they were
    monitor.close()
    reports = step_reports(transport)
    for step, layer_norms in enumerate(expected):
        report = reports[step]
        assert set(report["layers"]) == set(layer_norms) == {"net.0", "net.2", "head", "root"}
        for name, norm in layer_norms.items():
            assert report["layers"][name]["grad_norm"] == pytest.approx(norm, rel=1e-6)
        total = math.sqrt(sum(n**2 for n in layer_norms.values()))
        assert report["grad_norm"] == pytest.approx(total, rel=1e-6)
        assert report["nonfinite"]["grads"] == 0


def test_global_norm_equals_clip_grad_norm(make_monitor, transport):
    torch.manual_seed(1)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    train_steps(model, optimizer, monitor, 1)
    clip_total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf")))
    monitor.close()
    assert step_reports(transport)[0]["grad_norm"] == pytest.approx(clip_total, rel=1e-5)


class PartlyUnused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(3, 2)
        self.unused = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


def test_layer_whose_grads_are_all_none_is_marked_missing(make_monitor, transport):
    model = PartlyUnused()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    optimizer.zero_grad()
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    monitor.step()
    expected = float(torch.cat([p.grad.flatten() for p in model.used.parameters()]).norm())
    monitor.close()
    report = step_reports(transport)[0]
    assert report["layers"]["unused"]["grad_missing"] is True
    assert "grad_norm" not in report["layers"]["unused"]
    assert "grad_missing" not in report["layers"]["used"]
    assert report["grad_norm"] == pytest.approx(expected, rel=1e-6)


def test_non_finite_grads_are_counted_per_tensor(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    optimizer.zero_grad()
    model(torch.randn(5, 4)).sum().backward()
    model.head.weight.grad[0, 0] = float("nan")
    model.head.weight.grad[1, 1] = float("nan")  # same tensor: still one
    model.scale.grad[0] = float("inf")
    optimizer.step()
    monitor.step(loss=torch.tensor(1.0))
    monitor.close()
    body = transport.bodies[-1]
    validate(body)
    report = step_reports(transport)[0]
    assert report["nonfinite"]["grads"] == 2
    assert math.isnan(report["grad_norm"])
    assert math.isnan(report["layers"]["head"]["grad_norm"])
    assert math.isinf(report["layers"]["root"]["grad_norm"])
    assert math.isfinite(report["layers"]["net.0"]["grad_norm"])


def test_grad_norm_schedule(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, config_kwargs={"grad_norm_every_steps": 2, "heavy_every_steps": 3})
    train_steps(model, optimizer, monitor, 6)
    monitor.close()
    reports = step_reports(transport)
    assert [s for s, r in sorted(reports.items()) if "grad_norm" in r] == [0, 2, 4]
    assert [s for s, r in sorted(reports.items()) if "update_ratio" in r] == [0, 3]
