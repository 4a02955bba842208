"""What healthd tells the training process back: firing alerts, and the exception that stops a run.

What lives here: ``FiringAlert`` (one alert as the report push's answer carries it,
``healthd.wire.schema.FiringAlert`` on the server), ``parse_alerts`` (the sender thread reads an
answer's ``alerts`` with it) and ``TrainingStopped`` (what ``monitor.step()`` raises when a
``stop_on`` alert fires). What does not: when they are delivered (``healthd_client.monitor``).
Imports neither torch nor the server: ``import healthd_client`` stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

EvidenceValue = float | int | str | bool | None


@dataclass(frozen=True)
class FiringAlert:
    """A healthd alert firing for this job (any rank's, or the job's own when ``rank`` is None)."""

    id: str
    rule: str  # the alertname, e.g. "NonFiniteValues"
    severity: str  # "info" | "warning" | "critical"
    job: str
    rank: int | None
    step: int | None  # the step at which healthd first saw the condition
    summary: str
    layer: str | None = None
    evidence: dict[str, EvidenceValue] = field(default_factory=dict)

    def __str__(self) -> str:
        where = "job-wide" if self.rank is None else f"rank {self.rank}"
        return f"{self.rule} ({self.severity}, {where}, step {self.step}): {self.summary}"


class TrainingStopped(RuntimeError):
    """Raised at the next step after healthd reported an alert named in ``attach(stop_on=...)``.

    ``alert`` is the ``FiringAlert`` that stopped the run; the message names it and its evidence.
    """

    def __init__(self, alert: FiringAlert) -> None:
        evidence = ", ".join(f"{k}={v}" for k, v in alert.evidence.items())
        super().__init__(f"healthd stopped training: {alert}" + (f" [evidence: {evidence}]" if evidence else ""))
        self.alert = alert


def parse_alerts(text: str) -> tuple[FiringAlert, ...] | None:
    """The ``alerts`` of a ``POST /v1/reports`` answer (healthd leaves the field out when nothing
    fires); None when the answer is not healthd's JSON: then what the last answer said stands.
    Malformed entries are skipped."""
    try:
        raw = json.loads(text).get("alerts")
    except (ValueError, AttributeError):
        return None
    if raw is None:
        return ()
    if not isinstance(raw, list):
        return None
    out = []
    for item in raw:
        alert = _alert(item)
        if alert is not None:
            out.append(alert)
    return tuple(out)


def _alert(item: Any) -> FiringAlert | None:
    if not isinstance(item, dict):
        return None
    try:
        evidence = item.get("evidence") or {}
        layer = item.get("layer")
        return FiringAlert(
            id=str(item["id"]), rule=str(item["rule"]), severity=str(item["severity"]), job=str(item["job"]),
            rank=_int_or_none(item.get("rank")), step=_int_or_none(item.get("step")),
            summary=str(item.get("summary", "")), layer=layer if isinstance(layer, str) else None,
            evidence={str(k): v for k, v in evidence.items() if v is None or isinstance(v, float | int | str | bool)}
            if isinstance(evidence, dict) else {},
        )
    except (KeyError, TypeError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
