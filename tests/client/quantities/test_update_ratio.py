import math
import random

import pytest
import torch

from healthd_client.layers import build_layer_plan
from healthd_client.quantities.update_ratio import UpdateRatio, sample_view
from tests.client.conftest import Net, step_reports


def layer_params(model):
    return {name or "root": list(m.parameters(recurse=False))
            for name, m in model.named_modules() if list(m.parameters(recurse=False))}


def run_with_reference(model, optimizer, monitor, steps):
    """Train; return per step the full-copy reference ratios {layer: ratio, "": overall}."""
    refs = []
    groups = layer_params(model)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 2, (6,))).backward()
        before = {name: [p.detach().clone() for p in ps] for name, ps in groups.items()}
        optimizer.step()
        monitor.step()
        ref, d_all, w_all = {}, 0.0, 0.0
        for name, ps in groups.items():
            d = sum(float((p.detach() - b).double().norm()) ** 2 for p, b in zip(ps, before[name], strict=True))
            w = sum(float(b.double().norm()) ** 2 for b in before[name])
            ref[name] = math.sqrt(d) / math.sqrt(w)
            d_all, w_all = d_all + d, w_all + w
        ref[""] = math.sqrt(d_all) / math.sqrt(w_all)
        refs.append(ref)
    return refs


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
])
def test_exact_on_small_tensors(make_monitor, transport, make_optimizer):
    torch.manual_seed(0)
    model = Net()
    optimizer = make_optimizer(model.parameters())
    monitor = make_monitor(model, optimizer, config_kwargs={"heavy_every_steps": 1})
    refs = run_with_reference(model, optimizer, monitor, 3)
    monitor.close()
    reports = step_reports(transport)
    for step, ref in enumerate(refs):
        report = reports[step]
        assert report["update_ratio"] == pytest.approx(ref[""], rel=1e-5)
        for name, value in ref.items():
            if name:
                assert report["layers"][name]["update_ratio"] == pytest.approx(value, rel=1e-5)


def test_approximate_on_large_tensors(make_monitor, transport):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512),
                                torch.nn.Tanh(), torch.nn.Linear(512, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = make_monitor(model, optimizer, config_kwargs={"heavy_every_steps": 1,
                                                            "update_sample_per_tensor": 1024})
    refs = run_with_reference(model, optimizer, monitor, 2)
    monitor.close()
    reports = step_reports(transport)
    for step, ref in enumerate(refs):
        assert reports[step]["update_ratio"] == pytest.approx(ref[""], rel=0.2)
        assert reports[step]["layers"]["2"]["update_ratio"] == pytest.approx(ref["2"], rel=0.2)


def test_memory_overhead_is_the_sample_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.Linear(50, 3))  # 5000, 50, 150, 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = build_layer_plan(model, optimizer, max_layers=64)
    q = UpdateRatio(every_steps=1, sample_per_tensor=256)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.plan = plan
    q.on_attach(ctx)
    assert q.memory_overhead_bytes() == (256 + 50 + 150 + 3) * 4 + 4 * 8  # + one float64 weight per tensor


def test_monitor_reports_memory_overhead(make_monitor):
    model = torch.nn.Linear(1000, 100)  # 100_000 + 100 elements
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, config_kwargs={"update_sample_per_tensor": 64})
    assert 2 * 64 * 4 <= monitor.memory_overhead_bytes() < 4096


@pytest.mark.parametrize("n", [1, 5, 1023, 1024, 1025, 2047, 2048, 10_000, 65_537])
def test_sample_view_is_a_bounded_strided_view(n):
    t = torch.arange(n, dtype=torch.float32)
    view = sample_view(t, 1024, random.Random(n))
    assert view.numel() == min(n, 1024)
    assert view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()  # a view, not a copy
    idx = view.long()
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert len(set(idx.tolist())) == view.numel()
    t.add_(1)  # the view follows the tensor
    assert torch.equal(view.long(), idx + 1)


def test_sample_view_of_channels_last_and_non_dense_tensors():
    w = torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last)
    view = sample_view(w, 100, random.Random(0))
    assert view is not None and view.numel() == 100
    assert view.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    expanded = torch.randn(1, 300).expand(100, 300)
    assert sample_view(expanded, 100, random.Random(0)) is None
    assert sample_view(torch.empty(0), 100, random.Random(0)) is None


def test_samples_follow_a_model_moved_after_attach(make_monitor, transport):
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, config_kwargs={"heavy_every_steps": 1})
    model.double()  # replaces every p.data, as model.to("cuda") would
    optimizer.zero_grad()
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 2, (6,))).backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    monitor.step()
    d = sum(float((p.detach() - b).norm()) ** 2 for p, b in zip(model.parameters(), before, strict=True))
    w = sum(float(b.norm()) ** 2 for b in before)
    monitor.close()
    assert step_reports(transport)[0]["update_ratio"] == pytest.approx(math.sqrt(d / w), rel=1e-6)


def test_layer_that_did_not_move_has_ratio_zero(make_monitor, transport):
    model = Net()
    model.head.weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    monitor.step()
    monitor.close()
    report = step_reports(transport)[0]
    assert report["layers"]["head"]["update_ratio"] == 0.0
    assert report["layers"]["head"]["grad_missing"] is True
    assert report["layers"]["net.0"]["update_ratio"] > 0
