"""LargeBatchGeneralization: the global batch is a large fraction of the data set."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, Rule, WindowedConfig, WindowSteps, median
from healthd.state.windows import RankWindow
from healthd.wire.schema import Severity


class LargeBatchGeneralizationConfig(WindowedConfig):
    window_steps: WindowSteps = Field(default=5, description="steps whose median batch size is judged")
    warn_fraction: float = Field(default=0.1, gt=0, le=1, description="global batch / data set size that warns")
    info_fraction: float = Field(default=0.05, gt=0, le=1, description="global batch / data set size worth an info")
    noise_scale_warmup_steps: int = Field(
        default=100, ge=0, description="steps before the noise-scale comparison is judged: B_simple grows as "
        "training progresses (McCandlish et al. 2018, sec. 4), so early estimates are systematically small")
    noise_scale_warn_ratio: float = Field(
        default=10.0, gt=1, description="global batch / gradient noise scale B_simple above this warns")
    noise_scale_info_ratio: float = Field(
        default=0.1, gt=0, lt=1, description="global batch / B_simple below this informs (room for parallelism)")


class LargeBatchGeneralization(Rule[RankWindow, LargeBatchGeneralizationConfig]):
    """Each step's global batch (per-rank batch x world size) is a large fraction of the training set.

    Why: large-batch training converges to sharp minima that generalise worse
    (the "generalization gap"), and with few steps per epoch the noise that
    helps escape them is gone.
    Source: Keskar et al. 2017, "On Large-Batch Training for Deep Learning"
    (their large batches, ~10% of the data set, lost several points of test
    accuracy); McCandlish et al. 2018 (critical batch size; gradient noise scale
    can refine this once it is measured). Needs ``dataset_size=`` at attach.
    Thresholds: median global batch > 10% of the data set warns, > 5% informs.
    Full-batch training on a tiny data set is flagged too: say so in the config
    (``enabled: false``) if that is the intent.

    Noise-scale branch (DDP jobs, evaluated on rank 0 only): healthd measures
    the simple gradient noise scale B_simple (``healthd.state.noise_scale``,
    McCandlish et al. 2018), which approximates the critical batch size.
    A global batch above ``noise_scale_warn_ratio`` (10) x B_simple is in the
    regime of diminishing returns (each doubling of the batch buys almost no
    fewer steps) and of the large-batch generalization gap: warning. One below
    ``noise_scale_info_ratio`` (0.1) x B_simple could use ~10x more data
    parallelism at nearly the same sample efficiency: info.
    """

    name: ClassVar[str] = "LargeBatchGeneralization"
    severity: ClassVar[Severity] = Severity.WARNING
    Config = LargeBatchGeneralizationConfig
    advice: ClassVar[str] = (
        "Use a smaller batch (or more data); if you need the large batch for throughput, scale the learning "
        "rate with warm-up (Goyal et al. 2017), use LARS/LAMB, and watch the validation gap."
    )

    def evaluate(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        n = window.meta.dataset_size
        if not n:
            return self._noise_scale(window)
        sizes = [float(b) for b in window.present("batch_size", min(cfg.window_steps, len(window.steps))) if b]
        if not sizes:
            return None
        ws = window.meta.world_size
        global_batch = median(sizes) * ws
        fraction = global_batch / n
        if fraction <= cfg.info_fraction:
            return self._noise_scale(window)
        s = window.steps[-1]
        return Finding(
            summary=(f"Global batch {global_batch:g} ({median(sizes):g} x {ws} ranks) is {100 * fraction:.0f}% of "
                     f"the {n}-example data set (step {s.step}): large-batch generalization gap risk"),
            evidence={"step": s.step, "global_batch": global_batch, "dataset_size": n, "fraction": fraction},
            step=s.step,
            rank=window.rank,
            severity=None if fraction > cfg.warn_fraction else Severity.INFO,
        )

    def _noise_scale(self, window: RankWindow) -> Finding | None:
        cfg = self.config
        b_simple, global_batch = window.noise_scale, window.global_batch_size
        if window.rank != 0 or not b_simple or not global_batch or not window.steps:
            return None
        s = window.steps[-1]
        if s.step < cfg.noise_scale_warmup_steps:
            return None
        ratio = global_batch / b_simple
        evidence = {"step": s.step, "global_batch": global_batch, "noise_scale": b_simple, "ratio": ratio}
        if ratio > cfg.noise_scale_warn_ratio:
            return Finding(
                summary=(f"Global batch {global_batch} is {ratio:.0f}x the gradient noise scale B_simple = "
                         f"{b_simple:.3g} (step {s.step}): diminishing returns per example and large-batch "
                         "generalization gap risk"),
                evidence=evidence, step=s.step, rank=window.rank)
        if ratio < cfg.noise_scale_info_ratio:
            return Finding(
                summary=(f"Global batch {global_batch} is {ratio:.2g}x the gradient noise scale B_simple = "
                         f"{b_simple:.3g} (step {s.step}): the job could use more data parallelism (a larger "
                         "global batch) at nearly the same sample efficiency"),
                evidence=evidence, step=s.step, rank=window.rank, severity=Severity.INFO)
        return None
