"""MonitoringDegraded: the client stopped measuring a quantity, so healthd watches less than it seems."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from healthd.rules.base import Finding, ResolveAfterSteps, Rule, RuleConfig
from healthd.state.windows import JobWindow
from healthd.wire.schema import Severity


class MonitoringDegradedConfig(RuleConfig):
    resolve_after_steps: ResolveAfterSteps = Field(default=3, description="ticks without the finding before resolving")


class MonitoringDegraded(Rule[JobWindow, MonitoringDegradedConfig]):
    """A rank's client disabled one or more quantities (named, with the reason).

    Why: a quantity that fails (an exception in the client, e.g. a tensor type it cannot measure)
    is disabled so the training step goes on, with one warning in a log nobody reads. The rules that
    read it then stay silent because they are blind, not because the job is healthy: a job whose
    gradient norm is not measured can explode without ExplodingGradients. Saying so where on-call
    looks (an info alert, and the status page) turns a silent gap into a known one.

    How: each heartbeat lists the rank's disabled quantities and the reason; one finding per rank
    that lists any, on its last heartbeat (a closed rank's too: the run was watched partially).
    No threshold.
    """

    name: ClassVar[str] = "MonitoringDegraded"
    severity: ClassVar[Severity] = Severity.INFO
    Config = MonitoringDegradedConfig
    advice: ClassVar[str] = (
        "Rules that read the named quantities cannot fire for this rank. Read the reason; the client's "
        "warning in the training log has the full exception. Report it if the model or wrapper is supported."
    )

    def evaluate(self, window: JobWindow) -> list[Finding]:
        out = []
        for rank, st in sorted(window.ranks.items()):
            hb = st.last_heartbeat
            if hb is None or not hb.disabled_quantities:
                continue
            names = sorted({d.name for d in hb.disabled_quantities})
            reasons = "; ".join(f"{d.name}: {d.reason}" for d in hb.disabled_quantities)
            out.append(Finding(
                summary=f"rank {rank} no longer measures {', '.join(names)} ({reasons})",
                evidence={"quantities": ", ".join(names), "disabled_count": len(names)},
                step=hb.step, rank=rank,
            ))
        return out
