"""Activations against a naive reference: per-unit loops over the outputs the activation modules returned."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from healthd_client.quantities.activations import unit_stats
from tests.client.conftest import RecordingTransport, step_reports


def naive_fraction(kind: str, y: torch.Tensor) -> float:
    """Units are the last dim of a 2-d/3-d output, the channel dim (1) of a 4-d+ one; the rest are samples
    (a 1-d output is one unit)."""
    y = y.detach().double()
    if y.dim() <= 1:
        y = y.reshape(-1, 1)
    elif y.dim() >= 4:
        y = y.movedim(1, -1)
    rows = y.reshape(-1, y.shape[-1]).tolist()
    n, units = len(rows), len(rows[0])
    flagged = 0
    for j in range(units):
        column = [row[j] for row in rows]
        if kind == "relu":
            active = sum(1 for v in column if v > 0)
            flagged += active / n < 0.01
        else:
            flat = sum(1 for v in column if ((v < 0.02 or v > 0.98) if kind == "sigmoid" else abs(v) > 0.98))
            flagged += flat / n >= 0.9
    return flagged / units


class Mixed(torch.nn.Module):
    """Some units dead or saturated by construction (large biases), the others ordinary."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu = torch.nn.Linear(6, 16), torch.nn.ReLU()
        self.fc2, self.tanh = torch.nn.Linear(16, 12), torch.nn.Tanh()
        self.fc3, self.sigmoid = torch.nn.Linear(12, 10), torch.nn.Sigmoid()
        self.head = torch.nn.Linear(10, 3)
        with torch.no_grad():
            self.fc1.bias[:5] = -100.0  # 5 of 16 ReLU units never fire
            self.fc2.bias[:4] = 50.0  # 4 of 12 tanh units sit at +1
            self.fc3.bias[:3] = -50.0  # 3 of 10 sigmoid units sit at 0
            self.fc3.bias[3:5] = 50.0  # 2 more at 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.sigmoid(self.fc3(self.tanh(self.fc2(self.relu(self.fc1(x)))))))


def test_dead_and_saturated_fractions_match_naive(make_monitor: Any, transport: RecordingTransport) -> None:
    torch.manual_seed(0)
    model = Mixed()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen: dict[str, list[torch.Tensor]] = {"relu": [], "tanh": [], "sigmoid": []}
    handles = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen[name].append(o.detach()))
               for name in seen]
    monitor = make_monitor(model, optimizer, config_kwargs={"inspect_every_steps": 1, "inspect_first_steps": 1})
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(64, 6)), torch.randint(0, 3, (64,))).backward()
        optimizer.step()
        monitor.step()
    monitor.close()
    for h in handles:
        h.remove()
    reports = step_reports(transport)
    for step in range(3):
        acts = reports[step]["activations"]
        assert acts["relu"]["dead_fraction"] == pytest.approx(naive_fraction("relu", seen["relu"][step]))
        assert acts["tanh"]["saturated_fraction"] == pytest.approx(naive_fraction("tanh", seen["tanh"][step]))
        assert acts["sigmoid"]["saturated_fraction"] == pytest.approx(naive_fraction("sigmoid",
                                                                                     seen["sigmoid"][step]))
    assert acts["relu"]["dead_fraction"] >= 5 / 16 and acts["sigmoid"]["saturated_fraction"] >= 5 / 10


@pytest.mark.parametrize("shape", [(7,), (40, 9), (4, 10, 9), (4, 6, 5, 5), (2, 3, 4, 4, 4)])
@pytest.mark.parametrize("kind", ["relu", "tanh", "sigmoid"])
def test_unit_stats_matches_naive_on_every_layout(kind: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(len(shape))
    x = torch.randn(*shape) * 3
    if len(shape) > 1:  # units spread from always dead/flat to always active
        unit_dim = 1 if len(shape) >= 4 else len(shape) - 1
        offsets = [1] * len(shape)
        offsets[unit_dim] = shape[unit_dim]
        x = x + torch.linspace(-20, 20, shape[unit_dim]).reshape(offsets)
    y = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[kind](x)
    assert float(unit_stats(kind, y)) == pytest.approx(naive_fraction(kind, y))
