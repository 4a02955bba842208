"""GPUHardwareErrors: XID critical events, uncorrected ECC errors or failed row remapping on the rank's GPU."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules._gpu import device_label, last_samples, step_of
from healthd.rules.base import Finding, ResolveAfterSteps, Rule, RuleConfig
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity

# XIDs NVML reports as critical that are usually the application's own fault (illegal memory access,
# a kernel killed by the user, a page fault in user code): not a reason to page the hardware on-call.
APPLICATION_XIDS = (13, 31, 43, 45)


class GPUHardwareErrorsConfig(RuleConfig):
    window_samples: int = Field(default=12, ge=1,
                                description="GPU samples an XID event stays visible in (x gpu_sample_seconds)")
    ignored_xids: tuple[int, ...] = Field(default=APPLICATION_XIDS,
                                          description="XIDs that are application errors, not hardware")
    resolve_after_steps: ResolveAfterSteps = 50


class GPUHardwareErrors(Rule[RankWindow, GPUHardwareErrorsConfig]):
    """The rank's GPU reported a hardware fault: an XID critical event (other than the application-level
    ``ignored_xids`` 13, 31, 43, 45) in the last ``window_samples`` samples, a non-zero count of
    uncorrected ECC errors (volatile: since the last driver load or GPU reset), or a row-remapping
    failure. A row remap pending a reset alone is a warning.

    Why: these GPUs return wrong results or crash the job; retrying on the same device wastes the
    restart. Critical: page someone to drain the node and reset or replace the GPU.

    Source: NVIDIA's XID catalogue and GPU memory error management (row remapping) docs;
    dcgm-exporter's DCGM_FI_DEV_XID_ERRORS, DCGM_FI_DEV_ECC_DBE_VOL_TOTAL, DCGM_FI_DEV_ROW_REMAP_FAILURE.
    """

    name: ClassVar[str] = "GPUHardwareErrors"
    severity: ClassVar[Severity] = Severity.CRITICAL
    Config = GPUHardwareErrorsConfig
    advice: ClassVar[str] = (
        "Drain the node and restart the job elsewhere from its last checkpoint. Check `nvidia-smi -q -d "
        "ECC,ROW_REMAPPER` and the kernel log (dmesg | grep -i xid); a pending remap needs a GPU reset, a "
        "remap failure or repeated uncorrected errors mean an RMA."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        samples = last_samples(window.gpu, cfg.window_samples)
        if not samples:
            return None
        latest = samples[-1]
        xids = sorted({x for s in samples for x in s.xid_events if x not in cfg.ignored_xids})
        ecc = max((s.ecc_uncorrected_total or 0 for s in samples), default=0)
        failure = any(s.remapped_rows_failure for s in samples)
        pending = bool(latest.remapped_rows_pending)
        problems = []
        if xids:
            problems.append(f"XID {', '.join(map(str, xids))}")
        if ecc:
            problems.append(f"{ecc} uncorrected ECC errors")
        if failure:
            problems.append("row remapping failed")
        if pending:
            problems.append("row remap pending a GPU reset")
        if not problems:
            return None
        only_pending = not (xids or ecc or failure)
        return Finding(
            summary=f"Rank {window.rank}'s GPU reports {'; '.join(problems)} on {device_label(latest)}",
            evidence={"xids": ",".join(map(str, xids)), "ecc_uncorrected_total": ecc,
                      "remapped_rows_failure": failure, "remapped_rows_pending": pending,
                      "gpu": latest.gpu, "uuid": latest.uuid, "hostname": latest.hostname},
            step=step_of(window),
            rank=window.rank,
            severity=Severity.WARNING if only_pending else None,
        )
