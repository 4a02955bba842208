"""GpuMonitor against the NVML test double: UUID mapping, MIG, no-NVML, reports on the wire."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from healthd.wire.schema import GpuReport
from healthd_client.quantities.gpu import GpuMonitor, read_sample, resolve_device
from tests.client.conftest import Net, RecordingTransport, train_steps, validate
from tests.fake_nvml import FakeCuda, FakeDevice, FakeNvml, props

A = "aaaaaaaa-1111-2222-3333-444444444444"
B = "bbbbbbbb-1111-2222-3333-444444444444"
M = "cccccccc-1111-2222-3333-444444444444"


def two_gpus() -> tuple[FakeNvml, list[FakeDevice]]:
    a = FakeDevice(uuid=f"GPU-{A}", pci_bus_id="00000000:1B:00.0", util_gpu=11)
    b = FakeDevice(uuid=f"GPU-{B}", pci_bus_id="00000000:3B:00.0", util_gpu=22)
    return FakeNvml([a, b]), [a, b]  # NVML (PCI) order: a, b


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


# ---------------------------------------------------------------- mapping
def test_maps_by_torch_uuid_not_index() -> None:
    nvml, (a, b) = two_gpus()
    cuda = FakeCuda([props(B, bus=0x3B), props(A, bus=0x1B)])  # CUDA order differs from NVML's
    t0 = resolve_device(nvml, cuda, 0, None)
    t1 = resolve_device(nvml, cuda, 1, None)
    assert t0 is not None and t0.handle is b and t0.uuid == f"GPU-{B}" and t0.how == "torch_uuid"
    assert t1 is not None and t1.handle is a and t1.index == 1
    assert not t0.mig and t0.parent is t0.handle


@pytest.mark.parametrize("visible", [f"GPU-{B},GPU-{A}", f"GPU-{B[:8]},GPU-{A[:8]}"])
def test_cuda_visible_devices_as_uuids_when_torch_has_none(visible: str) -> None:
    nvml, (a, b) = two_gpus()
    cuda = FakeCuda([props(None), props(None)])
    t0, t1 = resolve_device(nvml, cuda, 0, visible), resolve_device(nvml, cuda, 1, visible)
    assert t0 is not None and t0.handle is b and t0.how == "cuda_visible_devices"
    assert t1 is not None and t1.handle is a


def test_cuda_visible_devices_indices_fall_back_to_pci_bus_id() -> None:
    nvml, (a, b) = two_gpus()
    # "1" is CUDA's numbering, not NVML's: the bus id is what identifies the device.
    cuda = FakeCuda([props(None, bus=0x3B)])
    t = resolve_device(nvml, cuda, 0, "1")
    assert t is not None and t.handle is b and t.how == "pci_bus_id"


def test_unknown_device_is_none() -> None:
    nvml, _ = two_gpus()
    assert resolve_device(nvml, FakeCuda([props("ffffffff-0000")]), 0, None) is None


def test_mig_slice_maps_to_parent_and_reports_no_utilization() -> None:
    parent = FakeDevice(uuid=f"GPU-{A}", temperature=71, clock_reasons=0x20 | 0x4)
    mig = FakeDevice(uuid=f"MIG-{M}", total=10 * 2**30, used=9 * 2**30, mig_parent=parent, gpu_instance_id=3)
    parent.migs = [mig]
    nvml = FakeNvml([parent])
    for cuda, visible in ((FakeCuda([props(M)]), None), (FakeCuda([props(None)]), f"MIG-{M}")):
        t = resolve_device(nvml, cuda, 0, visible)
        assert t is not None and t.mig and t.handle is mig and t.parent is parent
        assert t.uuid == f"GPU-{A}" and t.mig_uuid == f"MIG-{M}" and t.gpu_instance_id == 3
        s = read_sample(nvml, cuda, t)
        assert "utilization_gpu_ratio" not in s and "utilization_memory_ratio" not in s  # None, never 0
        assert s["memory_total_bytes"] == 10 * 2**30 and s["memory_used_bytes"] == 9 * 2**30  # the slice's
        assert s["temperature_celsius"] == 71.0  # the parent's
        assert s["throttle_reasons"] == ["sw_power_cap", "sw_thermal_slowdown"]


def test_sample_units_and_torch_allocator_view() -> None:
    nvml, (a, _) = two_gpus()
    a.util_gpu, a.util_mem, a.power_mw, a.energy_mj = 87, 33, 412_500, 5_000_000
    a.ecc_uncorrected, a.remap = 2, (0, 1, True, False)
    cuda = FakeCuda([props(A)], allocated=5, reserved=7, peak=9)
    t = resolve_device(nvml, cuda, 0, None)
    assert t is not None
    s = read_sample(nvml, cuda, t)
    assert s["utilization_gpu_ratio"] == pytest.approx(0.87) and s["utilization_memory_ratio"] == pytest.approx(0.33)
    assert s["power_watts"] == pytest.approx(412.5) and s["energy_joules"] == pytest.approx(5000.0)
    assert (s["torch_allocated_bytes"], s["torch_reserved_bytes"], s["torch_peak_bytes"]) == (5, 7, 9)
    assert s["ecc_uncorrected_total"] == 2 and s["remapped_rows_pending"] is True
    assert s["remapped_rows_failure"] is False and s["throttle_reasons"] == []
    GpuReport(job="j", time=1.0, gpu=0, uuid=t.uuid, **s)  # fits the wire contract


def test_sample_seconds_validated() -> None:
    for bad in (0, -1.0, float("inf"), True, "5"):
        with pytest.raises(ValueError, match="sample_seconds"):
            GpuMonitor(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- through attach()
def _attach(make_monitor: Callable[..., Any], gpu: GpuMonitor) -> tuple[Any, torch.optim.Optimizer, Any]:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, make_monitor(model, opt, extra_quantities=[gpu])


def test_sampler_emits_valid_gpu_reports_and_xids(make_monitor: Callable[..., Any],
                                                  transport: RecordingTransport) -> None:
    nvml, (a, b) = two_gpus()
    gpu = GpuMonitor(0.02, nvml_loader=lambda: nvml, cuda=FakeCuda([props(B), props(A)]), device=1)
    model, opt, monitor = _attach(make_monitor, gpu)
    assert [q.name for q in monitor.quantities].count("gpu") == 1  # replaced the built-in one
    assert nvml.registered == [a]
    train_steps(model, opt, monitor, 3)
    nvml.events.put(79)  # "GPU has fallen off the bus"
    wait_for(lambda: any(r.get("xid_events") for r in transport.of_kind("gpu")))
    monitor.close()
    assert nvml.shutdowns == 1 and not gpu._threads
    for body in transport.bodies:
        validate(body)
    gpus = transport.of_kind("gpu")
    assert {(r["gpu"], r["uuid"], r["rank"], r["job"]) for r in gpus} == {(1, f"GPU-{A}", 0, "test-job")}
    assert all(r["utilization_gpu_ratio"] == pytest.approx(0.11) for r in gpus)
    assert [x for r in gpus for x in r.get("xid_events", [])] == [79]
    assert len(transport.of_kind("step")) == 3  # steps are unaffected


@pytest.mark.parametrize("case", ["no_nvml", "no_cuda"])
def test_without_nvml_or_cuda_one_log_line_and_no_gpu_series(
    case: str, make_monitor: Callable[..., Any], transport: RecordingTransport, caplog: pytest.LogCaptureFixture
) -> None:
    nvml, _ = two_gpus()
    nvml.fail_init = case == "no_nvml"
    cuda = FakeCuda([props(A)] if case == "no_nvml" else [])
    caplog.set_level(logging.INFO, logger="healthd_client")
    model, opt, monitor = _attach(make_monitor, GpuMonitor(0.01, nvml_loader=lambda: nvml, cuda=cuda))
    train_steps(model, opt, monitor, 3)
    monitor.close()
    lines = [r for r in caplog.records if "GPU" in r.getMessage() or "NVML" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert ("NVML is not available" in lines[0].getMessage()) is (case == "no_nvml")
    assert transport.of_kind("gpu") == []
    assert len(transport.of_kind("step")) == 3 and monitor.disabled_quantities == []


def test_pynvml_import_failure_is_the_no_nvml_path(make_monitor: Callable[..., Any], transport: RecordingTransport,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    model, opt, monitor = _attach(make_monitor, GpuMonitor(0.01, nvml_loader=missing, cuda=FakeCuda([props(A)])))
    train_steps(model, opt, monitor, 2)
    monitor.close()
    assert transport.of_kind("gpu") == [] and "pynvml" in caplog.text
