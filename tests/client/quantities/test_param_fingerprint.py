from __future__ import annotations

from typing import Any

import torch

from healthd_client.quantities.param_fingerprint import tensor_weights
from tests.client.conftest import Net, RecordingTransport, step_reports, train_steps


def naive_fingerprint(model: torch.nn.Module) -> float:
    params = list(model.parameters())
    a, b = tensor_weights(list(range(len(params))))
    return sum(float(a[i]) * float(p.detach().double().sum()) + float(b[i]) * float(p.detach().double().square().sum())
               for i, p in enumerate(params))


def test_fingerprint_matches_naive_reference_and_schedule(make_monitor: Any, transport: RecordingTransport) -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, opt, rank=0, world_size=2, config_kwargs={"fingerprint_every_steps": 2})
    train_steps(model, opt, monitor, 3)  # fingerprints at steps 0 and 2
    expected = naive_fingerprint(model)  # parameters after step 2
    monitor.close()
    reports = step_reports(transport)
    assert "param_fingerprint" not in reports[1]
    assert "param_fingerprint" in reports[0]
    assert abs(reports[2]["param_fingerprint"] - expected) <= 1e-9 * abs(expected)


def test_fingerprint_changes_when_mass_moves_between_tensors() -> None:
    a, b = tensor_weights([0, 1])
    assert float(a[0]) != float(a[1]) and float(b[0]) != float(b[1])


def test_single_process_job_sends_no_fingerprint(make_monitor: Any, transport: RecordingTransport) -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, opt, config_kwargs={"fingerprint_every_steps": 1})
    train_steps(model, opt, monitor, 2)
    monitor.close()
    assert all("param_fingerprint" not in r for r in step_reports(transport).values())
