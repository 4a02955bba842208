"""What healthd tells the training process back: firing alerts, and the exception that stops a run.

What lives here: ``FiringAlert`` (one alert as the report push's answer carries it,
``healthd.wire.schema.FiringAlert`` on the server), ``parse_alerts`` (the sender thread reads an
answer's ``alerts`` with it) and ``TrainingStopped`` (what ``monitor.step()`` raises when a
``stop_on`` alert fires). What does not: when they are delivered (``healthd_client.monitor``).
Imports neither torch nor the server: ``import healthd_client`` stays light.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

EvidenceValue = float | int | str | bool | None

# What an alert (rule) name looks like ("NonFiniteValues"): attach(stop_on=), HEALTHD_STOP_ON, --stop-on.
ALERT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


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
    stream: str | None = None  # the named stream it is about (attach(stream=...)); None: the unnamed one

    def __str__(self) -> str:
        where = "job-wide" if self.rank is None else f"rank {self.rank}"
        if self.stream is not None:
            where += f", stream {self.stream}"
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
        stream = item.get("stream")
        return FiringAlert(
            id=str(item["id"]), rule=str(item["rule"]), severity=str(item["severity"]), job=str(item["job"]),
            rank=_int_or_none(item.get("rank")), step=_int_or_none(item.get("step")),
            summary=str(item.get("summary", "")), layer=layer if isinstance(layer, str) else None,
            stream=stream if isinstance(stream, str) else None,
            evidence={str(k): v for k, v in evidence.items() if v is None or isinstance(v, float | int | str | bool)}
            if isinstance(evidence, dict) else {},
        )
    except (KeyError, TypeError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class AlertActions:
    """What a job does with the alerts healthd answers with, on the training thread: ``on_alert`` for each
    newly firing alert, and for the first one named in ``stop_on``: ``on_stop``, then ``TrainingStopped``
    (unless an integration stops its loop itself: ``raise_on_stop`` False, it reads ``stopped_by``)."""

    def __init__(self, on_alert: Callable[[FiringAlert], object] | None, stop_on: Collection[str],
                 on_stop: Callable[[FiringAlert], object] | None, *, strict: bool,
                 warn: Callable[[str], None]) -> None:
        self.on_alert = on_alert
        self.stop_on = frozenset(stop_on)
        self.on_stop = on_stop
        self.strict = strict
        self.warn = warn
        self.listening = on_alert is not None or bool(self.stop_on)  # the monitor sends a NaN step at once
        self.raise_on_stop = True
        self.stopped_by: FiringAlert | None = None
        self._version = 0  # the sender's alerts_version last looked at
        self._told: set[str] = set()  # ids of the alerts already delivered

    def deliver(self, alerts: tuple[FiringAlert, ...], version: int) -> None:
        """Act on ``alerts`` (the sender's latest, ``version``) once each: one int comparison when unchanged."""
        if version == self._version:
            return
        self._version = version
        new = [a for a in alerts if a.id not in self._told]
        self._told.update(a.id for a in new)
        if self.on_alert is not None:
            for alert in new:
                self._call("on_alert", self.on_alert, alert)
        stop = next((a for a in new if a.rule in self.stop_on), None) if self.stopped_by is None else None
        if stop is None:
            return
        self.stopped_by = stop
        logging.getLogger("healthd_client").warning("healthd: stopping training on %s", stop)
        if self.on_stop is not None:
            self._call("on_stop", self.on_stop, stop)
        if self.raise_on_stop:
            raise TrainingStopped(stop)

    def _call(self, name: str, callback: Callable[[FiringAlert], object], alert: FiringAlert) -> None:
        try:
            callback(alert)
        except Exception as exc:  # a failing callback must not take the run down (nor prevent a stop)
            if self.strict:
                raise
            self.warn(f"healthd: the {name} callback failed on {alert.rule}: {exc!r}")
