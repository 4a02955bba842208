"""``healthd demo``: healthd in-process plus a small real training run with a fault.

Starts a real healthd (granian) on a free port, trains a small MLP on a
synthetic classification task on the CPU with ``healthd_client`` attached,
injects the chosen fault, shows a live view of progress, key metrics and alerts
as they fire, and ends with every alert's evidence and advice, grouped by
incident (the likely cause first, its consequences under it). torch is
imported only here, when the demo runs.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from healthd.engine.incidents import by_incident
from healthd.server.embedded import serve_in_thread
from healthd.settings import Settings


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    onset_step: int | None
    expected: tuple[str, ...]  # any of these alerts proves it was caught


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("none", "a healthy run (Adam, lr 1e-3): nothing above info should fire", None, ()),
    Fault("lr-too-high", "the learning rate is multiplied by 300 at step 60 (a broken schedule)", 60,
          ("LearningRateTooHigh", "LossDiverging", "ExplodingGradients", "NonFiniteValues")),
    Fault("nan", "a NaN enters the input batch at step 80 (a corrupt sample)", 80, ("NonFiniteValues",)),
    Fault("weights-not-updating", "the optimizer was built over a copy of the model", 0, ("WeightsNotUpdating",)),
)}


def run_demo(fault: str = "lr-too-high", steps: int = 300, live: bool = True, *,
             step_sleep_seconds: float = 0.01, out: Callable[[str], None] = print,
             settings: Settings | None = None) -> int:
    """Run the demo; returns 0 when the outcome is the expected one (fault caught / healthy run quiet).
    ``settings``: the healthd it starts (default ``Settings()``; tests add an Alertmanager)."""
    if fault not in FAULTS:
        out(f"unknown fault {fault!r}; choose one of: {', '.join(FAULTS)}")
        return 2
    import torch

    import healthd_client

    spec = FAULTS[fault]
    torch.manual_seed(0)
    tty = live and sys.stdout.isatty()
    with serve_in_thread(settings or Settings()) as server:
        out(f"healthd listening on {server.url}  (metrics: {server.url}/metrics, alerts: {server.url}/v1/alerts)")
        out(f"fault: {spec.name} - {spec.description}\n")
        job = f"demo-{spec.name}"
        model, data = _model_and_data(torch)
        params = model.parameters() if spec.name != "weights-not-updating" else _copy(model).parameters()
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9) if spec.name == "lr-too-high" else \
            torch.optim.Adam(params, lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        seen: set[str] = set()
        with healthd_client.attach(model, optimizer, job=job, server=server.url, num_classes=5,
                                   dataset_size=len(data[0])) as monitor:
            for step in range(steps):
                x, y = _batch(torch, data, step)
                if spec.name == "lr-too-high" and step == spec.onset_step:
                    for g in optimizer.param_groups:
                        g["lr"] *= 300
                if spec.name == "nan" and step >= (spec.onset_step or 0):
                    x = x.clone()
                    x[0, 0] = math.nan
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                monitor.step(loss=loss, batch_size=len(x))
                if step % 25 == 24:
                    with torch.no_grad():
                        vx, vy = data[2], data[3]
                        vl = loss_fn(model(vx), vy)
                        acc = (model(vx).argmax(1) == vy).float().mean()
                    monitor.eval(loss=vl, accuracy=acc)
                if step % 10 == 9 or step == steps - 1:
                    _show(server.url, job, step, float(loss.detach()), seen, tty, out)
                time.sleep(step_sleep_seconds)
        _wait_until_evaluated(server.url)  # the client flushed on close; its last batch may still wait
        if tty:
            out("")
        alerts = _alerts(server.url, job)
        for a in alerts:
            _announce(a, seen, out)
    return _summary(spec, alerts, out)


def _model_and_data(torch: Any) -> tuple[Any, tuple[Any, Any, Any, Any]]:
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(20, 5, generator=g)
    x = torch.randn(4096, 20, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(4096, 5, generator=g)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 5))
    return model, (x[:3584], y[:3584], x[3584:], y[3584:])


def _batch(torch: Any, data: tuple[Any, ...], step: int, size: int = 64) -> tuple[Any, Any]:
    n = len(data[0])
    i = (step * size) % (n - size)
    return data[0][i:i + size], data[1][i:i + size]


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def _alerts(url: str, job: str) -> list[dict[str, Any]]:
    try:
        return list(httpx.get(f"{url}/v1/alerts", params={"job": job}, timeout=5).json()["alerts"])
    except (httpx.HTTPError, ValueError, KeyError):
        return []


def _show(url: str, job: str, step: int, loss: float, seen: set[str], tty: bool, out: Callable[[str], None]) -> None:
    alerts = _alerts(url, job)
    firing = [a for a in alerts if a["state"] == "firing"]
    line = (f"step {step + 1:4d}  loss {loss:9.4g}  firing: "
            + (", ".join(f"{a['rule']}({a['severity']})" for a in firing) or "none"))
    new = [a for a in alerts if a["state"] != "pending" and a["id"] not in seen]
    if tty and not new:
        sys.stdout.write("\r" + line.ljust(100))
        sys.stdout.flush()
        return
    if tty:
        sys.stdout.write("\r" + " " * 100 + "\r")
    out(line)
    for a in new:
        _announce(a, seen, out)


def _announce(a: dict[str, Any], seen: set[str], out: Callable[[str], None]) -> None:
    if a["id"] in seen or a["state"] == "pending":
        return
    seen.add(a["id"])
    cause = f" [likely caused by {a['caused_by']}]" if a.get("caused_by") else ""
    out(f"  >> ALERT {a['rule']} [{a['severity']}] at step {a['step']} (rank {a['rank']}){cause}: {a['summary']}")


def _summary(spec: Fault, alerts: list[dict[str, Any]], out: Callable[[str], None]) -> int:
    loud = [a for a in alerts if a["state"] != "pending"]
    out("\n" + "=" * 100)
    incidents = by_incident(loud, id_of=lambda a: a["id"], incident_of=lambda a: a.get("incident"),
                            started_of=lambda a: a["started_at"])
    out(f"Summary: {len(loud)} alert(s) in {len(incidents)} incident(s) for fault '{spec.name}'")
    for n, group in enumerate(incidents, 1):
        out(f"\nIncident {n}: likely cause {group[0]['rule']}"
            + (f", {len(group) - 1} consequence(s)" if len(group) > 1 else ""))
        for a in group:
            indent = "  " if a is group[0] else "      "
            cause = f"  caused by {a['caused_by']}" if a.get("caused_by") and a is not group[0] else ""
            out(f"{indent}* {a['rule']}  severity={a['severity']}  state={a['state']}  step={a['step']}  "
                f"rank={a['rank']}{cause}")
            out(f"{indent}  what:     {a['summary']}")
            ev = ", ".join(f"{k}={_fmt(v)}" for k, v in a["evidence"].items() if v is not None)
            out(f"{indent}  evidence: {ev}")
            out(f"{indent}  advice:   {a['advice']}")
    if spec.expected:
        caught = [a for a in loud if a["rule"] in spec.expected]
        if caught:
            first = min(caught, key=lambda a: a["step"] if a["step"] is not None else 1 << 60)
            delay = (first["step"] - spec.onset_step) if first["step"] is not None and spec.onset_step else None
            out(f"\nCaught: {first['rule']} at step {first['step']}"
                + (f", {delay} step(s) after the fault began at step {spec.onset_step}." if delay is not None else "."))
            return 0
        out(f"\nNOT caught: expected one of {', '.join(spec.expected)}.")
        return 1
    above_info = [a for a in loud if a["severity"] != "info"]
    out("\nHealthy run: " + ("quiet (nothing above info)." if not above_info else
                             f"{len(above_info)} alert(s) above info - false alarm(s)."))
    return 0 if not above_info else 1


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _wait_until_evaluated(url: str, timeout_seconds: float = 10.0) -> None:
    """Wait until healthd has evaluated every accepted step (``/healthz``), at most ``timeout_seconds``."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if httpx.get(url + "/healthz", timeout=5).json().get("rank_evaluations_pending", 0) == 0:
            return
        time.sleep(0.05)
