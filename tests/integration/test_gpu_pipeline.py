"""NVML test double -> GPU sampler thread -> real healthd (granian) -> GPU rules and /metrics.

Two ranks in one process, each with its own monitor and fake GPU: rank 0's GPU is idle, nearly full,
hot and throws XID 79; rank 1's is healthy. What a user would see: alerts on rank 0, a job-wide
GPUImbalance, and GPU series labelled so they join dcgm-exporter's on UUID.
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

JOB = "gpu-pipeline"
GIB = 2**30
U0 = "00000000-0000-0000-0000-0000000000a0"
U1 = "00000000-0000-0000-0000-0000000000b1"


def _monitor(url: str, rank: int, nvml: FakeNvml, cuda: FakeCuda) -> tuple[Any, Any, Any]:
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = healthd_client.attach(
        model, opt, job=JOB, server=url, rank=rank, world_size=2,
        config=MonitorConfig(flush_interval_seconds=0.02, heartbeat_seconds=60.0),
        extra_quantities=[GpuMonitor(0.02, nvml_loader=lambda: nvml, cuda=cuda)],
    )
    return model, opt, monitor


def _steps(model: Any, opt: Any, monitor: Any, n: int) -> None:
    for _ in range(n):
        x = torch.randn(4, 8)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        monitor.step(loss=loss, batch_size=4)


def test_fake_gpus_drive_rules_and_metrics_through_a_real_healthd() -> None:
    bad = FakeDevice(uuid=f"GPU-{U0}", used=77 * GIB, util_gpu=30, temperature=93, clock_reasons=0x40)
    good = FakeDevice(uuid=f"GPU-{U1}", used=20 * GIB, util_gpu=95)
    nvml0, nvml1 = FakeNvml([good, bad]), FakeNvml([good, bad])  # same node, NVML order: good, bad
    settings = Settings.from_mapping({
        "engine": {"tick_seconds": 0.1},
        "rules": {"GPUHardwareErrors": {"window_samples": 256}},
    })
    with live_healthd(settings) as hd:
        m0 = _monitor(hd.url, 0, nvml0, FakeCuda([props(U0)]))  # CUDA device 0 of rank 0 is NVML's second
        m1 = _monitor(hd.url, 1, nvml1, FakeCuda([props(U1)]))
        try:
            def enough_samples() -> bool:
                ranks = hd.hd.store.jobs.get(JOB)
                return bool(ranks) and all(len(ranks.ranks[r].gpu) >= 30 for r in (0, 1) if r in ranks.ranks) \
                    and len(ranks.ranks) == 2

            wait_until(enough_samples, timeout_seconds=60, interval_seconds=0.05, what="30 GPU samples per rank")
            nvml0.events.put(79)
            wait_until(lambda: hd.hd.store.jobs[JOB].ranks[0].gpu_xid_totals, timeout_seconds=60,
                       interval_seconds=0.05, what="XID 79 reaches healthd")

            def firing() -> set[tuple[str, int | None]] | None:
                for m in (m0, m1):
                    _steps(*m, 2)
                alerts = httpx.get(f"{hd.url}/v1/alerts", params={"job": JOB, "state": "firing"}).json()["alerts"]
                got = {(a["rule"], a["rank"]) for a in alerts}
                want = {("GPUMemoryNearLimit", 0), ("LowGPUUtilization", 0), ("GPUThrottling", 0),
                        ("GPUHardwareErrors", 0), ("GPUImbalance", None)}
                return got if want <= got else None

            got = wait_until(firing, timeout_seconds=60, interval_seconds=0.05, what="GPU alerts firing")
            gpu_rules = {"GPUMemoryNearLimit", "GPUMemoryLeak", "LowGPUUtilization", "SmallBatchUnderutilization",
                         "GPUThrottling", "GPUHardwareErrors"}
            assert not {r for r, rank in got if rank == 1 and r in gpu_rules}, got  # the healthy rank is quiet
            assert ("SmallBatchUnderutilization", 0) not in got  # memory is full: not a batch-size problem
            alerts = httpx.get(f"{hd.url}/v1/alerts", params={"job": JOB}).json()["alerts"]
            hw = next(a for a in alerts if a["rule"] == "GPUHardwareErrors")
            assert hw["severity"] == "critical" and "XID 79" in hw["summary"] and hw["evidence"]["uuid"] == f"GPU-{U0}"

            text = httpx.get(f"{hd.url}/metrics").text
        finally:
            for m in (m0, m1):
                m[2].close()
    samples = {(s.name, s.labels.get("rank"), s.labels.get("xid"), s.labels.get("reason")): s
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    util0 = samples[("trainhealth_gpu_utilization_ratio", "0", None, None)]
    assert util0.value == pytest.approx(0.30)
    assert util0.labels == {"job": JOB, "rank": "0", "stream": "", "gpu": "0", "UUID": f"GPU-{U0}", "GPU_I_ID": "",
                            "hostname": util0.labels["hostname"]}
    assert samples[("trainhealth_gpu_utilization_ratio", "1", None, None)].labels["UUID"] == f"GPU-{U1}"
    assert samples[("trainhealth_gpu_memory_used_bytes", "0", None, None)].value == 77 * GIB
    assert samples[("trainhealth_gpu_xid_events_total", "0", "79", None)].value == 1
    assert samples[("trainhealth_gpu_clock_event_active", "0", None, "hw_thermal_slowdown")].value == 1
    assert samples[("trainhealth_gpu_temperature_celsius", "0", None, None)].value == 93
    assert ("trainhealth_gpu_xid_events_total", "1", "79", None) not in samples
