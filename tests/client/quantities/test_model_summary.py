import torch

from tests.client.conftest import Net


def test_model_and_optimizer_summary_in_attach_report(make_monitor, transport):
    model = Net()
    model.net[0].bias.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    monitor = make_monitor(model, optimizer)
    monitor.close()
    (attach,) = transport.of_kind("attach")
    total = sum(p.numel() for p in model.parameters())
    assert attach["model"]["param_count"] == total
    assert attach["model"]["trainable_count"] == total - 8
    layers = {layer["name"]: layer for layer in attach["model"]["layers"]}
    assert layers["net.0"] == {"name": "net.0", "module_type": "Linear", "params": 40, "shapes": [[8, 4], [8]]}
    assert layers["root"]["shapes"] == [[2]]
    assert attach["optimizer"]["name"] == "Adam"
    assert attach["optimizer"]["param_groups"] == 1
    hyper = attach["optimizer"]["hyperparams"]
    assert hyper["lr"] == 1e-3 and hyper["betas.0"] == 0.8 and hyper["betas.1"] == 0.95
    assert hyper["amsgrad"] is False
