"""On a real NVIDIA GPU (H100/H200): NVML readings, a sync-free monitored CUDA step, the overhead benchmark.

Marked ``gpu``: skipped where torch sees no CUDA device (CI, CPU machines). Run on a GPU machine with
CUDA PyTorch and ``pip install -e '.[test]'`` (nvidia-ml-py)::

    pytest -m gpu -s tests/integration/test_gpu_real.py

``HEALTHD_BENCH_OUT=path.json`` keeps the benchmark's numbers (for docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

import pytest
import torch

import healthd_client
from healthd_client import MonitorConfig
from healthd_client.quantities.gpu import GpuMonitor, read_sample, resolve_device
from tests.client.conftest import RecordingTransport, validate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with NVML"),
]


def _pynvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def test_real_nvml_readings_for_the_cuda_device() -> None:
    nvml = _pynvml()
    try:
        index = torch.cuda.current_device()
        torch.ones(1, device="cuda")  # a CUDA context, so NVML sees this process's memory
        target = resolve_device(nvml, torch.cuda, index, os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert target is not None and target.how == "torch_uuid"
        name = nvml.nvmlDeviceGetName(target.parent)
        props = torch.cuda.get_device_properties(index)
        s = read_sample(nvml, torch.cuda, target)
        print(f"\n{name}: {json.dumps({'uuid': target.uuid, 'mig': target.mig, **s})}")
        assert target.uuid.startswith("GPU-")
        if not target.mig:
            assert target.uuid == f"GPU-{props.uuid}"
            assert 0.0 <= s["utilization_gpu_ratio"] <= 1.0
        else:
            assert "utilization_gpu_ratio" not in s
        # NVML's total is the device's; torch's total_memory excludes what the driver reserves.
        assert s["memory_total_bytes"] >= props.total_memory * 0.9
        assert 0 < s["memory_used_bytes"] <= s["memory_total_bytes"]
        assert 10.0 <= s["temperature_celsius"] <= 110.0 and s["power_watts"] > 0
        assert isinstance(s["throttle_reasons"], list)
        assert s["torch_allocated_bytes"] >= 4
    finally:
        nvml.nvmlShutdown()


def _loop(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]],
          monitor: Any) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(loss=loss, batch_size=len(x))


def test_monitored_cuda_training_adds_no_host_sync() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = [(torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")) for _ in range(30)]
    torch.cuda.synchronize()
    # The loop alone is sync-free: any error below is the monitor's.
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loop(model, opt, batches[:3], None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    transport = RecordingTransport()
    config = MonitorConfig(heavy_every_steps=1, grad_norm_every_steps=1, gpu_sample_seconds=0.05,
                           flush_interval_seconds=0.05)
    monitor = healthd_client.attach(model, opt, job="gpu-sync", transport=transport, config=config, strict=True)
    assert any(isinstance(q, GpuMonitor) and q.target is not None for q in monitor.quantities)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loop(model, opt, batches, monitor)  # every quantity due at every step
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monitor.close()
    for body in transport.bodies:
        validate(body)
    steps = transport.of_kind("step")
    assert len(steps) == len(batches) and all(s.get("grad_norm") is not None for s in steps)
    assert transport.of_kind("gpu"), "the sampler thread reported the GPU"
    assert monitor.disabled_quantities == []


def test_overhead_benchmark_on_the_gpu() -> None:
    from bench.overhead import EVERY_STEP, GPU_WORKLOADS, measure

    results = []
    for name in GPU_WORKLOADS:
        for cname, cfg in (("default", {}), ("every-step", EVERY_STEP)):
            r = measure(GPU_WORKLOADS[name], torch.device("cuda"), cfg, blocks=10, block_steps=10,
                        config_name=cname)
            print(f"\n{r.workload} [{cname}]: base {r.baseline_ms:.2f} ms, monitored {r.monitored_ms:.2f} ms, "
                  f"overhead {r.overhead_pct:+.2f}%, monitor memory {r.monitor_memory_bytes} B")
            assert r.baseline_ms > 0 and r.monitored_ms > 0 and r.monitor_memory_bytes > 0
            results.append(asdict(r))
    out = os.environ.get("HEALTHD_BENCH_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=2)
