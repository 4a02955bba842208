"""A test double of the few NVML (pynvml) functions healthd_client's GPU sampler uses, and a CUDA facade.

``FakeNvml`` holds devices in NVML's (PCI) order; ``FakeCuda`` sees them in an
order of its own (CUDA's), so a sampler that mapped by index would read the
wrong GPU. Device state is plain attributes the test changes between samples.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_TIMEOUT = 10


@dataclass
class FakeDevice:
    uuid: str
    pci_bus_id: str = "00000000:00:00.0"
    total: int = 80 * 2**30
    used: int = 10 * 2**30
    util_gpu: int = 95
    util_mem: int = 40
    temperature: int = 55
    power_mw: int = 300_000
    energy_mj: int = 1_000_000
    clock_reasons: int = 0
    ecc_uncorrected: int = 0
    remap: tuple[int, int, bool, bool] = (0, 0, False, False)
    mig_parent: FakeDevice | None = None
    gpu_instance_id: int | None = None
    migs: list[FakeDevice] = field(default_factory=list)


class FakeNvml:
    """Module-like object: pass ``lambda: fake`` as ``nvml_loader``."""

    NVMLError = NVMLError
    NVML_ERROR_TIMEOUT = NVML_ERROR_TIMEOUT
    NVML_TEMPERATURE_GPU = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, devices: list[FakeDevice], *, fail_init: bool = False) -> None:
        self.devices = devices
        self.fail_init = fail_init
        self.initialised = 0
        self.shutdowns = 0
        self.registered: list[FakeDevice] = []
        self.events: queue.Queue[int] = queue.Queue()
        self.calls: list[str] = []
        self.calls_lock = threading.Lock()

    def _log(self, name: str) -> None:
        with self.calls_lock:
            self.calls.append(name)

    def _all(self) -> list[FakeDevice]:
        return [d for dev in self.devices for d in (dev, *dev.migs)]

    # lifecycle
    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError(12)  # NVML_ERROR_LIBRARY_NOT_FOUND
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    # lookup
    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeDevice:
        return self.devices[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeDevice:
        self._log("nvmlDeviceGetHandleByUUID")
        for d in self._all():
            if d.uuid == uuid:
                return d
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByPciBusId(self, bus: str) -> FakeDevice:
        for d in self.devices:
            if d.pci_bus_id.upper() == bus.upper():
                return d
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, h: FakeDevice) -> str:
        return h.uuid

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeDevice) -> int:
        return len(h.migs)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeDevice, j: int) -> FakeDevice:
        return h.migs[j]

    def nvmlDeviceIsMigDeviceHandle(self, h: FakeDevice) -> bool:
        return h.mig_parent is not None

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: FakeDevice) -> FakeDevice:
        assert h.mig_parent is not None
        return h.mig_parent

    def nvmlDeviceGetGpuInstanceId(self, h: FakeDevice) -> int:
        if h.gpu_instance_id is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return h.gpu_instance_id

    # readings
    def nvmlDeviceGetMemoryInfo(self, h: FakeDevice) -> Any:
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeDevice) -> Any:
        if h.mig_parent is not None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=h.util_gpu, memory=h.util_mem)

    def _physical(self, h: FakeDevice) -> FakeDevice:
        if h.mig_parent is not None:  # like NVML: these are not supported on a MIG handle
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return h

    def nvmlDeviceGetTemperature(self, h: FakeDevice, sensor: int) -> int:
        return self._physical(h).temperature

    def nvmlDeviceGetPowerUsage(self, h: FakeDevice) -> int:
        return self._physical(h).power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: FakeDevice) -> int:
        return self._physical(h).energy_mj

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: FakeDevice) -> int:
        return self._physical(h).clock_reasons

    def nvmlDeviceGetTotalEccErrors(self, h: FakeDevice, error_type: int, counter_type: int) -> int:
        return self._physical(h).ecc_uncorrected

    def nvmlDeviceGetRemappedRows(self, h: FakeDevice) -> tuple[int, int, bool, bool]:
        return self._physical(h).remap

    # XID events
    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceRegisterEvents(self, h: FakeDevice, types: int, event_set: object) -> None:
        self.registered.append(self._physical(h))

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> Any:
        try:
            xid = self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise NVMLError(NVML_ERROR_TIMEOUT) from None
        return SimpleNamespace(eventType=self.nvmlEventTypeXidCriticalError, eventData=xid)

    def nvmlEventSetFree(self, event_set: object) -> None:
        pass


@dataclass
class _Props:
    uuid: str | None
    pci_bus_id: int = 0
    pci_device_id: int = 0
    pci_domain_id: int = 0


class FakeCuda:
    """The slice of ``torch.cuda`` the sampler reads. ``props[i]`` is CUDA device i as the job sees it."""

    def __init__(self, props: list[_Props], allocated: int = 2**30, reserved: int = 2 * 2**30,
                 peak: int = 3 * 2**30, current: int = 0) -> None:
        self.props = props
        self.allocated = allocated
        self.reserved = reserved
        self.peak = peak
        self.current = current

    def is_available(self) -> bool:
        return bool(self.props)

    def current_device(self) -> int:
        return self.current

    def get_device_properties(self, i: int) -> _Props:
        return self.props[i]

    def memory_allocated(self, i: int) -> int:
        return self.allocated

    def memory_reserved(self, i: int) -> int:
        return self.reserved

    def max_memory_allocated(self, i: int) -> int:
        return self.peak


def props(uuid: str | None, bus: int = 0) -> _Props:
    """CUDA device properties: ``uuid`` as torch prints it (no ``GPU-`` prefix)."""
    return _Props(uuid=uuid, pci_bus_id=bus)
