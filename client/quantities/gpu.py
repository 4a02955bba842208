"""GPU sampling through NVML: a background thread emitting GpuReport dicts.

What lives here: ``GpuMonitor`` (a ``Quantity`` that never touches the step:
``every_steps=0``), the CUDA-index -> NVML-handle mapping (``resolve_device``),
one sample of a device (``read_sample``) and the XID event watcher. What does
not: rules about the samples (``healthd.rules.gpu_*``), their exposition
(``healthd.exposition.gpu``).

Design notes:
- The NVML module is injected (``nvml_loader``; default ``import pynvml``, from
  the ``nvidia-ml-py`` package) and so is the CUDA facade (``cuda``; default
  ``torch.cuda``), so that CI drives everything with a test double.
- A rank's CUDA device is mapped to NVML by UUID, never by index: NVML
  enumerates in PCI order, CUDA (by default) fastest first, and
  ``CUDA_VISIBLE_DEVICES`` renumbers and may hold UUIDs (``GPU-...``/``MIG-...``,
  prefixes allowed). Order of attempts: torch's device UUID, then the
  ``CUDA_VISIBLE_DEVICES`` entry when it is a UUID, then the PCI bus id.
- On a MIG slice, memory is the slice's; utilisation is not supported by NVML
  there and is reported as None (never 0); temperature, power, clocks, ECC
  and row remapping are the parent GPU's. ``uuid`` is the parent's UUID, as
  dcgm-exporter labels its series (``UUID`` plus ``GPU_I_ID`` for MIG).
- No CUDA or no NVML: one log line, no GPU reports, nothing else changes.
- Every read happens on the sampler thread; the training thread only starts
  and stops it. torch's allocator counters are host-side reads (no sync).
- One sampler per (job, rank) in a process (``per_process``): with several monitors
  (streams), the first one's samples, and when it closes while another stays open,
  ``hand_over`` moves the running sampler to that one (no restart, no gap).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from healthd_client.identity import label_safe
from healthd_client.quantities.base import Quantity

if TYPE_CHECKING:
    from healthd_client.quantities.base import QuantityContext

logger = logging.getLogger("healthd_client")

# NVML clock event ("throttle") reason bits -> the names sent in ``throttle_reasons``.
# Values from nvml.h (nvmlClocksEventReason*); fixed by the driver ABI.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
_XID_WAIT_MS = 500  # how long one nvmlEventSetWait blocks; bounds close() latency
_MAX_XIDS_PER_REPORT = 64  # GpuReport.xid_events max_length


def _load_pynvml() -> Any:
    import pynvml  # nvidia-ml-py

    return pynvml


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DeviceTarget:
    """A rank's CUDA device, resolved to NVML handles."""

    index: int  # CUDA index as the job sees it
    handle: Any  # the device itself (a MIG device handle on a MIG slice)
    parent: Any  # the physical GPU (== handle when not MIG)
    uuid: str  # physical GPU UUID ("GPU-...")
    mig_uuid: str | None
    gpu_instance_id: int | None
    how: str  # "torch_uuid", "cuda_visible_devices" or "pci_bus_id": how the mapping was found

    @property
    def mig(self) -> bool:
        return self.mig_uuid is not None


def _torch_uuid(cuda: Any, index: int) -> str | None:
    try:
        raw = getattr(cuda.get_device_properties(index), "uuid", None)
    except Exception:
        return None
    return None if raw is None else _decode(raw).strip() or None


def _uuid_candidates(raw: str) -> list[str]:
    """NVML UUID strings a CUDA UUID may correspond to (torch prints it without a prefix)."""
    if raw.startswith(("GPU-", "MIG-")):
        return [raw]
    return [f"GPU-{raw}", f"MIG-{raw}"]


def _visible_entry(cuda_visible_devices: str | None, index: int) -> str | None:
    if not cuda_visible_devices:
        return None
    entries = [e.strip() for e in cuda_visible_devices.split(",") if e.strip()]
    return entries[index] if index < len(entries) else None


def _all_uuids(nvml: Any) -> list[tuple[str, Any]]:
    """(uuid, handle) of every NVML device, MIG devices included."""
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        out.append((_decode(nvml.nvmlDeviceGetUUID(h)), h))
        with contextlib.suppress(Exception):
            for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    m = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                except Exception:
                    continue
                out.append((_decode(nvml.nvmlDeviceGetUUID(m)), m))
    return out


def _handle_by_uuid_prefix(nvml: Any, prefix: str) -> Any | None:
    """CUDA_VISIBLE_DEVICES accepts unambiguous UUID prefixes; NVML wants the full UUID."""
    with contextlib.suppress(Exception):
        return nvml.nvmlDeviceGetHandleByUUID(prefix)
    matches = [h for u, h in _all_uuids(nvml) if u.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def _pci_bus_id(cuda: Any, index: int) -> str | None:
    try:
        p = cuda.get_device_properties(index)
        return f"{int(p.pci_domain_id):08X}:{int(p.pci_bus_id):02X}:{int(p.pci_device_id):02X}.0"
    except Exception:
        return None


def resolve_device(nvml: Any, cuda: Any, index: int, cuda_visible_devices: str | None) -> DeviceTarget | None:
    """Map CUDA device ``index`` (as this process sees it) to its NVML handles, or None."""
    handle, how = None, ""
    raw = _torch_uuid(cuda, index)
    if raw:
        for candidate in _uuid_candidates(raw):
            try:
                handle, how = nvml.nvmlDeviceGetHandleByUUID(candidate), "torch_uuid"
                break
            except Exception:
                continue
    if handle is None:
        entry = _visible_entry(cuda_visible_devices, index)
        if entry and entry.startswith(("GPU-", "MIG-")):
            handle, how = _handle_by_uuid_prefix(nvml, entry), "cuda_visible_devices"
    if handle is None:
        bus = _pci_bus_id(cuda, index)
        if bus:
            with contextlib.suppress(Exception):
                handle, how = nvml.nvmlDeviceGetHandleByPciBusId(bus), "pci_bus_id"
    if handle is None:
        return None
    is_mig = False
    with contextlib.suppress(Exception):
        is_mig = bool(nvml.nvmlDeviceIsMigDeviceHandle(handle))
    if not is_mig:
        return DeviceTarget(index, handle, handle, _decode(nvml.nvmlDeviceGetUUID(handle)), None, None, how)
    parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    gi: int | None = None
    with contextlib.suppress(Exception):
        gi = int(nvml.nvmlDeviceGetGpuInstanceId(handle))
    return DeviceTarget(index, handle, parent, _decode(nvml.nvmlDeviceGetUUID(parent)),
                        _decode(nvml.nvmlDeviceGetUUID(handle)), gi, how)


def _try(fn: Callable[[], Any]) -> Any:
    """An NVML read, or None where the device does not support it (or it fails)."""
    try:
        return fn()
    except Exception:
        return None


def read_sample(nvml: Any, cuda: Any, target: DeviceTarget) -> dict[str, Any]:
    """One GpuReport's measurements (without job/rank/time); unsupported reads are left out."""
    h, p = target.handle, target.parent
    out: dict[str, Any] = {}
    mem = _try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
    if mem is not None:
        out["memory_used_bytes"] = int(mem.used)
        out["memory_total_bytes"] = int(mem.total)
    for key, fn in (("torch_allocated_bytes", "memory_allocated"), ("torch_reserved_bytes", "memory_reserved"),
                    ("torch_peak_bytes", "max_memory_allocated")):
        v = _try(functools.partial(getattr(cuda, fn), target.index))
        if v is not None:
            out[key] = int(v)
    if not target.mig:  # NVML has no utilisation counters for a MIG slice: None, not 0
        util = _try(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
        if util is not None:
            out["utilization_gpu_ratio"] = min(1.0, max(0.0, util.gpu / 100.0))
            out["utilization_memory_ratio"] = min(1.0, max(0.0, util.memory / 100.0))
    temp = _try(lambda: nvml.nvmlDeviceGetTemperature(p, nvml.NVML_TEMPERATURE_GPU))
    if temp is not None:
        out["temperature_celsius"] = float(temp)
    power = _try(lambda: nvml.nvmlDeviceGetPowerUsage(p))  # milliwatts
    if power is not None:
        out["power_watts"] = power / 1000.0
    energy = _try(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(p))  # millijoules since driver load
    if energy is not None:
        out["energy_joules"] = energy / 1000.0
    reasons = _try(lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(p))
    if reasons is not None:
        out["throttle_reasons"] = [name for bit, name in CLOCK_EVENT_REASONS.items() if int(reasons) & bit]
    ecc = _try(lambda: nvml.nvmlDeviceGetTotalEccErrors(p, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                                         nvml.NVML_VOLATILE_ECC))
    if ecc is not None:
        out["ecc_uncorrected_total"] = int(ecc)
    remap = _try(lambda: nvml.nvmlDeviceGetRemappedRows(p))  # (corrected, uncorrected, pending, failure)
    if remap is not None:
        out["remapped_rows_pending"] = bool(remap[2])
        out["remapped_rows_failure"] = bool(remap[3])
    return out


class GpuMonitor(Quantity):
    """Samples this rank's GPU every ``sample_seconds`` on a daemon thread; watches XID events on another.

    ``nvml_loader`` returns the NVML module (default: ``import pynvml``);
    ``cuda`` is the CUDA facade (default ``torch.cuda``); ``device`` the CUDA
    index to watch (default: the device of the model's first CUDA parameter,
    else ``cuda.current_device()``).
    """

    name = "gpu"
    per_process = True  # one sampler per (job, rank) in a process, whatever the number of monitors (streams)

    def __init__(self, sample_seconds: float = 5.0, *, nvml_loader: Callable[[], Any] | None = None,
                 cuda: Any = None, device: int | None = None,
                 cuda_visible_devices: str | None = None) -> None:
        super().__init__(every_steps=0)
        if isinstance(sample_seconds, bool) or not isinstance(sample_seconds, (int, float)) or not (
            0 < sample_seconds < float("inf")
        ):
            raise ValueError(f"sample_seconds must be a number of seconds > 0, got {sample_seconds!r}")
        self.sample_seconds = float(sample_seconds)
        self._loader = nvml_loader or _load_pynvml
        self._cuda = cuda
        self._device = device
        self._visible = cuda_visible_devices
        self._nvml: Any = None
        self.target: DeviceTarget | None = None
        self.samples_total = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._xids: list[int] = []
        self._lock = threading.Lock()
        self._emit_lock = threading.Lock()  # an emit in flight finishes before a hand-over swaps the target
        self._threads: list[threading.Thread] = []
        self._emit: Callable[[dict[str, Any]], None] | None = None
        self._hostname = ""

    # ------------------------------------------------------------------ Quantity hooks

    def on_attach(self, ctx: QuantityContext) -> None:
        cuda = self._cuda
        if cuda is None:
            import torch

            cuda = self._cuda = torch.cuda
        if not cuda.is_available():
            logger.info("healthd: no CUDA device; GPU monitoring is off for this rank")
            return
        try:
            nvml = self._loader()
            nvml.nvmlInit()
        except Exception as exc:
            logger.warning("healthd: NVML is not available (%s); no GPU series for this rank", exc)
            return
        self._nvml = nvml
        index = self._device if self._device is not None else self._model_device(ctx, cuda)
        visible = self._visible if self._visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
        self.target = resolve_device(nvml, cuda, index, visible)
        if self.target is None:
            logger.warning("healthd: CUDA device %d not found in NVML; no GPU series for this rank", index)
            self._shutdown_nvml()
            return
        self._emit = ctx.emit
        self._hostname = ctx.identity.hostname
        sampler = threading.Thread(target=self._sample_loop, name="healthd-gpu-sampler", daemon=True)
        self._threads = [sampler]
        event_set = self._register_xid_events(nvml, self.target)
        if event_set is not None:
            self._threads.append(threading.Thread(target=self._xid_loop, args=(event_set,),
                                                  name="healthd-gpu-xid", daemon=True))
        for t in self._threads:
            t.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=max(2.0, _XID_WAIT_MS / 1000 * 4))
        self._threads = []
        self._shutdown_nvml()

    def hand_over(self, ctx: QuantityContext) -> None:
        """Go on sampling for another open monitor of this (job, rank): the sampler thread keeps running and
        its next sample goes out through ``ctx`` (under that monitor's stream): no gap, no second sampler.
        An emit in flight through the closing monitor finishes first, while its sender still runs."""
        with self._emit_lock:
            if self._emit is not None:  # None: never sampled (no CUDA or NVML here), nothing to move
                self._emit = ctx.emit
                self._hostname = ctx.identity.hostname

    def memory_overhead_bytes(self) -> int:
        return 0  # no device memory; host: a few dicts per sample

    # ------------------------------------------------------------------ threads

    @staticmethod
    def _model_device(ctx: QuantityContext, cuda: Any) -> int:
        for p in ctx.model.parameters():
            if p.device.type == "cuda":
                return int(p.device.index if p.device.index is not None else cuda.current_device())
        return int(cuda.current_device())

    def sample_once(self) -> dict[str, Any] | None:
        """Read and emit one sample now (the sampler thread calls this); returns the report."""
        target, emit = self.target, self._emit
        if target is None or emit is None:
            return None
        report: dict[str, Any] = {"kind": "gpu", "gpu": target.index, "uuid": label_safe(target.uuid),
                                  "hostname": self._hostname, "mig": target.mig}
        if target.mig:
            report["mig_uuid"] = label_safe(target.mig_uuid or "") or None
            if target.gpu_instance_id is not None:
                report["gpu_instance_id"] = target.gpu_instance_id
        report.update(read_sample(self._nvml, self._cuda, target))
        with self._lock:
            xids, self._xids = self._xids[:_MAX_XIDS_PER_REPORT], self._xids[_MAX_XIDS_PER_REPORT:]
        if xids:
            report["xid_events"] = xids
        with self._emit_lock:  # through the monitor that owns the sampler now (``hand_over``)
            emit = self._emit
            if emit is None:
                return None
            emit(report)
            self.samples_total += 1
        return report

    def _sample_loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample_once()
                self._wake.wait(self.sample_seconds)
                self._wake.clear()
        except Exception as exc:  # never reaches training; GPU series stop
            logger.warning("healthd: GPU sampler failed and stops: %r", exc)

    @staticmethod
    def _register_xid_events(nvml: Any, target: DeviceTarget) -> Any | None:
        try:
            event_set = nvml.nvmlEventSetCreate()
        except Exception:
            return None
        try:
            nvml.nvmlDeviceRegisterEvents(target.parent, nvml.nvmlEventTypeXidCriticalError, event_set)
        except Exception as exc:  # e.g. not supported in a container without the capability
            logger.info("healthd: XID events unavailable on %s: %r", target.uuid, exc)
            with contextlib.suppress(Exception):
                nvml.nvmlEventSetFree(event_set)
            return None
        return event_set

    def _xid_loop(self, event_set: Any) -> None:
        nvml = self._nvml
        try:
            while not self._stop.is_set():
                try:
                    data = nvml.nvmlEventSetWait_v2(event_set, _XID_WAIT_MS)
                except nvml.NVMLError as exc:
                    if getattr(exc, "value", None) == nvml.NVML_ERROR_TIMEOUT:
                        continue
                    raise
                if data.eventType & nvml.nvmlEventTypeXidCriticalError:
                    with self._lock:
                        self._xids.append(int(data.eventData))
                    self._wake.set()  # report it now, not at the next period
        except Exception as exc:
            logger.warning("healthd: XID watcher failed and stops: %r", exc)
        finally:
            with contextlib.suppress(Exception):
                nvml.nvmlEventSetFree(event_set)

    def _shutdown_nvml(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()

