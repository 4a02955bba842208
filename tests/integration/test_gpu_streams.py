"""Two streams in one process, one GPU: one set of GPU series and one GPU alert, not one per stream.

A GAN's generator and discriminator are two monitors of rank 0 (streams "generator" and
"discriminator"), each attached with the same fake NVML whose GPU is nearly full. Only the first
monitor samples the GPU (healthd_client.attachment), so /metrics has one series per GPU family,
under the generator's stream, and GPUMemoryNearLimit fires once. When the generator's monitor closes
first, the discriminator's takes the sampler over and the one series moves to its stream.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import healthd_client
from healthd.settings import Settings
from healthd_client import MonitorConfig
from healthd_client.quantities.gpu import GpuMonitor
from tests.fake_nvml import FakeCuda, FakeDevice, FakeNvml, props
from tests.integration.servers import wait_until
from tests.live import live_healthd

pytestmark = pytest.mark.integration

JOB = "gpu-streams"
GIB = 2**30
U0 = "00000000-0000-0000-0000-0000000000c0"


def _monitor(url: str, stream: str, nvml: FakeNvml, cuda: FakeCuda) -> tuple[Any, Any, Any]:
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = healthd_client.attach(
        model, opt, job=JOB, server=url, rank=0, world_size=1, stream=stream, loss_kind="adversarial",
        config=MonitorConfig(flush_interval_seconds=0.02, heartbeat_seconds=60.0),
        extra_quantities=[GpuMonitor(0.02, nvml_loader=lambda: nvml, cuda=cuda)],
    )
    return model, opt, monitor


def test_two_streams_of_one_process_give_one_gpu_series_and_one_gpu_alert() -> None:
    full = FakeDevice(uuid=f"GPU-{U0}", used=78 * GIB, util_gpu=95)
    nvml, cuda = FakeNvml([full]), FakeCuda([props(U0)])
    settings = Settings.from_mapping({"engine": {"tick_seconds": 0.1}})
    with live_healthd(settings) as hd:
        pairs = [_monitor(hd.url, s, nvml, cuda) for s in ("generator", "discriminator")]
        try:
            def firing() -> list[dict[str, Any]] | None:
                for model, opt, monitor in pairs:
                    opt.zero_grad()
                    loss = model(torch.randn(4, 8)).pow(2).mean()
                    loss.backward()
                    opt.step()
                    monitor.step(loss=loss, batch_size=4)
                alerts = httpx.get(f"{hd.url}/v1/alerts", params={"job": JOB, "state": "firing"}).json()["alerts"]
                near = [a for a in alerts if a["rule"] == "GPUMemoryNearLimit"]
                return near or None

            wait_until(firing, timeout_seconds=60, interval_seconds=0.05, what="GPUMemoryNearLimit firing")
            text = httpx.get(f"{hd.url}/metrics").text
            alerts = httpx.get(f"{hd.url}/v1/alerts", params={"job": JOB}).json()["alerts"]
        finally:
            for _, _, m in pairs:
                m.close()
    near = [a for a in alerts if a["rule"] == "GPUMemoryNearLimit"]
    assert len(near) == 1 and near[0]["rank"] == 0, near
    gpu = [s for fam in text_string_to_metric_families(text) for s in fam.samples
           if s.name == "trainhealth_gpu_memory_used_bytes" and s.labels.get("job") == JOB]
    assert len(gpu) == 1 and gpu[0].value == 78 * GIB, gpu
    assert gpu[0].labels["stream"] == "generator"
    steps = {s.labels["stream"] for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == "trainhealth_step" and s.labels.get("job") == JOB}
    assert steps == {"generator", "discriminator"}  # both streams report their steps


def _gpu_series(url: str) -> list[Any]:
    text = httpx.get(f"{url}/metrics").text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "trainhealth_gpu_memory_used_bytes" and s.labels.get("job") == JOB]


def test_when_the_sampling_stream_closes_the_gpu_series_go_on_under_the_other_one() -> None:
    """Issue 24's note: the generator's monitor samples the GPU and closes first; the discriminator's stays
    open. Its monitor takes the sampler over, and /metrics shows the GPU once, now under its stream."""
    full = FakeDevice(uuid=f"GPU-{U0}", used=40 * GIB, util_gpu=95)
    nvml, cuda = FakeNvml([full]), FakeCuda([props(U0)])
    with live_healthd(Settings()) as hd:
        (_, _, generator), (model, opt, discriminator) = (_monitor(hd.url, s, nvml, cuda)
                                                          for s in ("generator", "discriminator"))
        try:
            wait_until(lambda: _gpu_series(hd.url), timeout_seconds=60, interval_seconds=0.05, what="GPU series")
            assert [s.labels["stream"] for s in _gpu_series(hd.url)] == ["generator"]
            generator.close()
            full.used = 41 * GIB  # a value only the new owner's samples carry

            def moved() -> list[Any] | None:
                opt.zero_grad()
                loss = model(torch.randn(4, 8)).pow(2).mean()
                loss.backward()
                opt.step()
                discriminator.step(loss=loss, batch_size=4)
                series = _gpu_series(hd.url)
                return series if [(s.labels["stream"], s.value) for s in series] == [("discriminator", 41 * GIB)] \
                    else None

            series = wait_until(moved, timeout_seconds=60, interval_seconds=0.05, what="GPU series moved")
        finally:
            discriminator.close()
            generator.close()
    assert len(series) == 1  # the generator's last sample is not kept as a second, frozen series
    assert nvml.initialised == 1 and nvml.shutdowns == 1  # one sampler throughout, stopped with the last monitor
