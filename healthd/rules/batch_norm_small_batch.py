"""BatchNormSmallBatch: batch norm trained on a tiny per-device batch (or unsynchronised under DDP)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Rule, WindowedConfig, WindowSteps, median
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class BatchNormSmallBatchConfig(WindowedConfig):
    window_steps: WindowSteps = Field(default=5, description="steps whose median batch size is judged")
    warn_batch_size: int = Field(default=8, ge=2, description="per-device batch below which it warns")
    critical_batch_size: int = Field(default=2, ge=1, description="per-device batch below which it is critical")
    info_batch_size: int = Field(default=16, ge=2, description="per-device batch below which, under DDP "
                                 "without SyncBatchNorm, it informs")


class BatchNormSmallBatch(Rule[RankWindow, BatchNormSmallBatchConfig]):
    """The model has batch norm and the per-device batch is tiny.

    Why: batch norm normalises with the batch's own mean and variance; with a
    few examples these estimates are noisy, training is unstable and the running
    statistics do not match inference. Under DDP each rank normalises over its
    own slice unless SyncBatchNorm is used.
    Source: Wu & He 2018 ("Group Normalization": BN's error rises sharply below
    8 examples per GPU, moderately below 16); J. Tobin, "Troubleshooting Deep
    Neural Networks" (Full Stack Deep Learning, 2019) on batch-norm pitfalls.
    Signal: the client's static check at attach (batch-norm layers, SyncBatchNorm)
    and the reported batch size. Thresholds: median of the last ``window_steps``
    batch sizes < 8 warns, < 2 is critical; with world_size > 1 and no
    SyncBatchNorm, < 16 is an info.
    """

    name: ClassVar[str] = "BatchNormSmallBatch"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = BatchNormSmallBatchConfig
    advice: ClassVar[str] = (
        "Raise the per-device batch size (gradient accumulation does not help batch norm), convert with "
        "torch.nn.SyncBatchNorm.convert_sync_batchnorm under DDP, or use GroupNorm/LayerNorm instead."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        attach = window.meta.attach
        if attach is None:
            return None
        bns = [f for f in attach.static_findings if f.check in ("batchnorm", "sync_batchnorm")]
        if not bns:
            return None
        sizes = window.present("batch_size", min(cfg.window_steps, len(window.steps)))  # the kept whole steps
        if len(sizes) < min(cfg.window_steps, 3):
            return None
        batch = median([float(b) for b in sizes])
        synced = any(f.check == "sync_batchnorm" for f in bns)
        ws = window.meta.world_size
        if batch < cfg.critical_batch_size:
            severity: Severity | None = Severity.CRITICAL
        elif batch < cfg.warn_batch_size:
            severity = None
        elif ws > 1 and not synced and batch < cfg.info_batch_size:
            severity = Severity.INFO
        else:
            return None
        s = window.steps[-1]
        return Finding(
            summary=(f"Batch norm ({bns[0].layer or '?'} and {len(bns) - 1} more) trains on {batch:g} examples per "
                     f"device (median of the last {len(sizes)} steps; world size {ws}, "
                     f"{'SyncBatchNorm' if synced else 'no SyncBatchNorm'}; rank {window.rank})"),
            evidence={"step": s.step, "batch_size": batch, "batchnorm_layers": len(bns), "world_size": ws,
                      "sync_batchnorm": synced},
            step=s.step,
            rank=window.rank,
            layer=bns[0].layer,
            severity=severity,
        )
