"""Inputs against a naive reference: mean, sample std and max |x| of the first floating input, in plain Python."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pytest
import torch

from tests.client.conftest import Net, RecordingTransport, step_reports


def test_input_stats_match_naive(make_monitor: Any, transport: RecordingTransport) -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, config_kwargs={"inspect_every_steps": 1, "inspect_first_steps": 1})
    batches = [torch.randn(5, 4) * 7 + 3, torch.rand(6, 4), torch.randn(2, 4) * 0.01 - 5]
    for x in batches:
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
        monitor.step()
    monitor.close()
    reports = step_reports(transport)
    for step, x in enumerate(batches):
        values = [float(v) for v in x.flatten().tolist()]
        got = reports[step]["inputs"]
        assert got["mean"] == pytest.approx(statistics.fmean(values), rel=1e-5, abs=1e-6)
        assert got["std"] == pytest.approx(statistics.stdev(values), rel=1e-5)
        assert got["abs_max"] == pytest.approx(max(abs(v) for v in values), rel=1e-6)
        assert math.isfinite(got["std"])
