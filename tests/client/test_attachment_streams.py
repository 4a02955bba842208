"""attach(stream=...): a stream's name travels in every report; two open monitors of one (job, rank, stream)
in a process are refused at the second attach."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import healthd_client
from healthd_client import MonitorConfig
from tests.client.conftest import FAST, RecordingTransport


def _pair() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), 0.1)


def test_a_second_monitor_of_one_job_rank_and_stream_is_refused_naming_them() -> None:
    (g, opt_g), (d, opt_d) = _pair(), _pair()
    first = healthd_client.attach(g, opt_g, "gan", transport=RecordingTransport(), config=MonitorConfig(**FAST))
    try:
        with pytest.raises(ValueError, match=r"job 'gan', rank 0, the unnamed stream.*stream=\"discriminator\""):
            healthd_client.attach(d, opt_d, "gan", transport=RecordingTransport(), config=MonitorConfig(**FAST))
        second = healthd_client.attach(d, opt_d, "gan", stream="discriminator", transport=RecordingTransport(),
                                       config=MonitorConfig(**FAST))
        (g2, opt_g2) = _pair()
        with pytest.raises(ValueError, match=r"rank 0, stream 'discriminator'"):
            healthd_client.attach(g2, opt_g2, "gan", stream="discriminator", transport=RecordingTransport())
        second.close(timeout=5.0)
        healthd_client.attach(g2, opt_g2, "gan", stream="discriminator", transport=RecordingTransport(),
                              config=MonitorConfig(**FAST)).close(timeout=5.0)  # the first one closed
    finally:
        first.close(timeout=5.0)


def test_every_report_of_a_named_stream_carries_it_and_attach_carries_loss_kind_and_a_monitor_id() -> None:
    model, opt = _pair()
    transport = RecordingTransport()
    m = healthd_client.attach(model, opt, "gan", stream="generator", loss_kind="adversarial", transport=transport,
                              config=MonitorConfig(**FAST))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    m.step(loss=1.0)
    m.close(timeout=5.0)
    reports = transport.reports()
    assert {r["kind"] for r in reports} >= {"attach", "step", "heartbeat"}
    assert all(r["stream"] == "generator" for r in reports)
    (a,) = transport.of_kind("attach")
    assert a["hints"]["loss_kind"] == "adversarial" and len(a["monitor_id"]) == 16


@pytest.mark.parametrize(("kwargs", "match"), [({"stream": "Gen"}, "stream must be"), ({"stream": "x" * 33}, "stream"),
                                               ({"loss_kind": "maximized"}, "loss_kind must be")])
def test_a_bad_stream_or_loss_kind_is_a_value_error(kwargs: dict, match: str) -> None:
    model, opt = _pair()
    with pytest.raises(ValueError, match=match):
        healthd_client.attach(model, opt, "gan", transport=RecordingTransport(), **kwargs)
