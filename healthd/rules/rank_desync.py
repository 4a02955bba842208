"""RankDesync: parameters that must be identical on every rank are not."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, JobWindow, Rule, RuleConfig, Scope
from healthd.schema import Severity


class RankDesyncConfig(RuleConfig):
    rtol: float = Field(default=1e-6, ge=0, description="relative difference of fingerprints tolerated")
    atol: float = Field(default=0.0, ge=0, description="absolute difference of fingerprints tolerated")
    resolve_after_steps: int = Field(default=30, ge=1, description="ticks without the finding before resolving")


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))


class RankDesync(Rule[RankDesyncConfig]):
    """Ranks' parameter fingerprints differ at the same step.

    Why: data parallelism assumes every replica holds the same weights after
    each step. A rank-dependent code path (clipping, a scheduler or an
    optimizer state touched on one rank only, a non-broadcast initialisation,
    a missed all-reduce, a bit flip) silently turns one job into N diverging
    models; the loss may look fine. TrainCheck (Jiang et al., OSDI 2025) found
    real silent errors of exactly this kind, e.g. BLOOM-176B's gradient
    clipping diverging across ranks.

    How: the client sends a cheap parameter fingerprint (a fixed weighted sum
    of per-tensor sums and squared norms, computed on the device without a
    host sync) every N steps, at the same steps on every rank. At the latest
    step that at least two live ranks fingerprinted, ranks are grouped by
    fingerprint (``rtol``, ``atol``); ranks outside the largest group (ties:
    the group holding the lowest rank) are findings. Meant for parameters
    replicated across ranks (DDP); turn it off for sharded models (FSDP,
    tensor parallelism), where ranks hold different shards.
    """

    name: ClassVar[str] = "RankDesync"
    severity: ClassVar[Severity] = Severity.CRITICAL
    scope: ClassVar[Scope] = Scope.JOB
    Config = RankDesyncConfig
    advice: ClassVar[str] = (
        "Replicas diverged. Look for code that runs on some ranks only (if rank == 0 around optimizer, clipping, "
        "scheduler or parameter edits), initialisation that is not broadcast, and model changes after wrapping "
        "in DDP; compare state_dicts of two ranks at the reported step."
    )

    def evaluate(self, window: JobWindow) -> list[Finding]:  # type: ignore[override]
        cfg = self.config
        by_rank: dict[int, dict[int, float]] = {}
        for rank, st in window.ranks.items():
            if st.closed:
                continue
            fps = {s.step: s.param_fingerprint for s in st.steps if s.param_fingerprint is not None}
            if fps:
                by_rank[rank] = fps  # type: ignore[assignment]
        if len(by_rank) < 2:
            return []
        counts: dict[int, int] = {}
        for fps in by_rank.values():
            for step in fps:
                counts[step] = counts.get(step, 0) + 1
        shared = [s for s, n in counts.items() if n >= 2]
        if not shared:
            return []
        step = max(shared)
        values = {r: fps[step] for r, fps in sorted(by_rank.items()) if step in fps}
        groups: list[list[int]] = []
        for r, v in values.items():
            for g in groups:
                if _close(values[g[0]], v, cfg.rtol, cfg.atol):
                    g.append(r)
                    break
            else:
                groups.append([r])
        if len(groups) == 1:
            return []
        reference = max(groups, key=lambda g: (len(g), -g[0]))
        ref_value = values[reference[0]]
        out = []
        for r, v in values.items():
            if r in reference:
                continue
            rel = abs(v - ref_value) / max(abs(ref_value), 1e-300)
            out.append(Finding(
                summary=(f"rank {r}'s parameters differ from rank {reference[0]}'s at step {step} "
                         f"(fingerprint {v:.10g} vs {ref_value:.10g}, relative difference {rel:.3g})"),
                evidence={"fingerprint": v, "reference_fingerprint": ref_value, "reference_rank": reference[0],
                          "relative_difference": rel, "ranks_compared": len(values),
                          "ranks_agreeing": len(reference)},
                step=step, rank=r,
            ))
        return out
