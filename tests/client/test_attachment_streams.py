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


def test_only_the_first_open_monitor_of_a_job_and_rank_samples_the_gpu() -> None:
    """Two streams of one process share its GPU: a second sampler would report the same device again."""
    from healthd_client.quantities.gpu import GpuMonitor

    def gpu() -> GpuMonitor:
        return GpuMonitor(60.0, nvml_loader=lambda: None, cuda=None)

    (g, opt_g), (d, opt_d), (o, opt_o) = _pair(), _pair(), _pair()
    kw = {"transport": RecordingTransport(), "config": MonitorConfig(**FAST)}
    first = healthd_client.attach(g, opt_g, "gan", stream="generator", extra_quantities=[gpu()], **kw)
    second = healthd_client.attach(d, opt_d, "gan", stream="discriminator", extra_quantities=[gpu()], **kw)
    other_job = healthd_client.attach(o, opt_o, "other", extra_quantities=[gpu()], **kw)
    try:
        assert [q.name for q in first.quantities].count("gpu") == 1
        assert "gpu" not in [q.name for q in second.quantities]
        assert [q.name for q in other_job.quantities].count("gpu") == 1  # another job reports its own
    finally:
        for m in (second, other_job, first):
            m.close(timeout=5.0)
    (d2, opt_d2) = _pair()
    third = healthd_client.attach(d2, opt_d2, "gan", stream="discriminator", extra_quantities=[gpu()], **kw)
    try:  # the first one closed: the next monitor samples the GPU
        assert [q.name for q in third.quantities].count("gpu") == 1
    finally:
        third.close(timeout=5.0)


def test_the_gpu_sampler_is_handed_to_the_next_open_monitor_when_its_owner_closes() -> None:
    """Issue 24's note: the owner of the GPU sampler closes while another stream stays open. The same sampler
    thread goes on through the other monitor: every sample it took reached exactly one transport (none lost
    in the hand-over, none sent twice), NVML was initialised once, and it stops with the last monitor."""

    from healthd_client.quantities.gpu import GpuMonitor
    from tests.client.quantities.test_gpu import wait_for
    from tests.fake_nvml import FakeCuda, FakeDevice, FakeNvml, props

    uuid = "aaaaaaaa-1111-2222-3333-444444444444"
    nvml = FakeNvml([FakeDevice(uuid=f"GPU-{uuid}", util_gpu=40)])
    sampler = GpuMonitor(0.01, nvml_loader=lambda: nvml, cuda=FakeCuda([props(uuid)]), device=0)
    transports = {name: RecordingTransport() for name in ("generator", "discriminator", "critic")}
    monitors = {}
    for name, transport in transports.items():
        model, opt = _pair()
        monitors[name] = healthd_client.attach(model, opt, "gan", stream=name, transport=transport,
                                               config=MonitorConfig(**FAST), extra_quantities=[sampler])

    def gpu_reports(name: str) -> list[dict]:
        return transports[name].of_kind("gpu")

    try:
        assert [m for m in monitors.values() if sampler in m.quantities] == [monitors["generator"]]
        (thread,) = [t for t in sampler._threads if t.name == "healthd-gpu-sampler"]
        wait_for(lambda: len(gpu_reports("generator")) >= 3)
        monitors["generator"].close(timeout=5.0)
        assert nvml.shutdowns == 0 and thread.is_alive()  # not restarted: the same thread samples on
        assert sampler in monitors["discriminator"].quantities  # the first open one of the (job, rank)
        wait_for(lambda: len(gpu_reports("discriminator")) >= 3)
        monitors["discriminator"].close(timeout=5.0)  # handed over again
        assert sampler in monitors["critic"].quantities and thread.is_alive()
        wait_for(lambda: len(gpu_reports("critic")) >= 3)
    finally:
        for m in monitors.values():
            m.close(timeout=5.0)
    assert not thread.is_alive() and nvml.initialised == 1 and nvml.shutdowns == 1
    by_stream = {name: gpu_reports(name) for name in transports}
    assert all(r["stream"] == name for name, reports in by_stream.items() for r in reports)
    assert sum(len(r) for r in by_stream.values()) == sampler.samples_total  # each sample sent once, none lost


def test_a_hand_over_skips_closed_monitors_and_other_jobs_and_stops_with_none_left() -> None:
    from healthd_client.quantities.gpu import GpuMonitor
    from tests.fake_nvml import FakeCuda, FakeDevice, FakeNvml, props

    uuid = "aaaaaaaa-1111-2222-3333-444444444444"
    nvml = FakeNvml([FakeDevice(uuid=f"GPU-{uuid}")])
    sampler = GpuMonitor(60.0, nvml_loader=lambda: nvml, cuda=FakeCuda([props(uuid)]), device=0)
    kw = {"transport": RecordingTransport(), "config": MonitorConfig(**FAST)}
    (g, opt_g), (d, opt_d), (o, opt_o) = _pair(), _pair(), _pair()
    owner = healthd_client.attach(g, opt_g, "gan", stream="generator", extra_quantities=[sampler], **kw)
    closed = healthd_client.attach(d, opt_d, "gan", stream="discriminator", **kw)
    other_job = healthd_client.attach(o, opt_o, "other", **kw)
    closed.close(timeout=5.0)
    try:
        owner.close(timeout=5.0)
        assert sampler not in closed.quantities and sampler not in other_job.quantities
        assert nvml.shutdowns == 1 and not sampler._threads  # nobody of the (job, rank) left: it stopped
    finally:
        other_job.close(timeout=5.0)
