"""Run fault-zoo scenarios against an in-process healthd and score them.

Each scenario trains a small model on CPU with ``healthd_client.attach`` whose
transport hands each batch to ``Healthd.ingest`` directly (no HTTP; the same
code path behind ``POST /v1/reports``). An engine listener records, for every
alert that reaches *firing*, the step of the finding that made it fire, so the
detection delay is measured in training steps, independent of batching.
The DDP cases (``bench.faultzoo.ddp``) run under real ``torchrun`` instead, their
two ranks reporting over HTTP to the same kind of healthd served on a free port.

Scoring: a fault is detected when its expected alert fired (other alerts may
fire too; they are listed). Steps to detect = firing step - the fault's onset.
A control raises a false alarm when any alert above ``info`` fired.

Pages: the alerts above ``info`` of a run that Alertmanager would not inhibit, i.e. incident roots. The
engine labels every firing alert with its ``caused_by`` (``healthd.engine.incidents``; the shipped
``deploy/alertmanager/alertmanager.yml`` inhibit rules mute exactly those while their cause fires, and a
cause stays firing while a consequence it caused does), so a run's pages are its fired alerts, final
severity above info, with no ``caused_by`` at the end of the run: one per (rule, rank, stream), as
Alertmanager tells alerts apart by their labels. A consequence that fired a few steps before its cause
and was adopted by it counts as inhibited (Alertmanager holds a new group for ``group_wait``, 30 s).

Alerts are recorded per (rule, stream): ``fired`` is keyed by ``alert_key`` (the rule's name on the
unnamed stream, ``Rule[stream]`` on a named one) and each entry carries its ``stream``. A fault of a
scenario with ``stream`` is detected only by its alert on that stream.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from healthd.engine.alerts import Alert
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.wire.schema import AlertState, Severity


class InProcessTransport:
    """A healthd_client transport that ingests into a Healthd object (no network)."""

    def __init__(self, hd: Healthd) -> None:
        self.hd = hd

    def send(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
        status, result = self.hd.ingest(body)
        return status, result.model_dump_json()


def alert_key(rule: str, stream: str | None) -> str:
    """The key of a (rule, stream) in a result's ``fired``: ``MissingZeroGrad[generator]``, or the rule alone."""
    return rule if stream is None else f"{rule}[{stream}]"


class FiringRecorder:
    """Engine listener: first firing step and the highest severity per rule and stream."""

    def __init__(self) -> None:
        self.fired: dict[str, dict[str, Any]] = {}

    def on_transition(self, alert: Alert, previous: AlertState) -> None:
        key = alert_key(alert.rule, alert.stream)
        if alert.state is AlertState.FIRING and key not in self.fired:
            self.fired[key] = {"step": alert.last_step, "severity": alert.severity.value,
                               "summary": alert.summary, "stream": alert.stream}


@dataclass
class Result:
    name: str
    kind: str  # "fault" or "control"
    expected: str | None
    onset: int
    steps: int
    stream: str | None = None  # the stream the expected alert must fire on
    fired: dict[str, dict[str, Any]] = field(default_factory=dict)
    detected: bool = False
    detect_step: int | None = None
    steps_to_detect: int | None = None
    false_alarms: list[str] = field(default_factory=list)
    pages: list[str] = field(default_factory=list)  # alerts above info Alertmanager would not inhibit
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.detected if self.kind == "fault" else not self.false_alarms


def run_one(scenario: Any, seed: int = 0) -> Result:
    """Train one scenario with a fresh healthd and score it (``seed``: see ``scenarios.SEED``)."""
    from bench.faultzoo.ddp import DdpScenario
    from bench.faultzoo.scenarios import SEED

    if isinstance(scenario, DdpScenario):
        return _run_torchrun(scenario, seed)
    token = SEED.set(seed)
    try:
        return _run_one(scenario, seed)
    finally:
        SEED.reset(token)


def _zoo_healthd(recorder: FiringRecorder) -> Healthd:
    # Every request's ranks evaluated before it is answered (rank_rules_cpu_share = 1): the zoo measures
    # the rules, at the same evaluation points every run; under load the budget only delays them.
    return build(Settings.from_mapping({"engine": {"rank_rules_cpu_share": 1.0}}), listeners=[recorder])


def _run_one(scenario: Any, seed: int) -> Result:
    from healthd_client import MonitorConfig, attach

    recorder = FiringRecorder()
    hd = _zoo_healthd(recorder)
    t0 = time.perf_counter()
    setup = scenario.setup()
    kwargs = dict(job=f"zoo-{scenario.name}", transport=InProcessTransport(hd),
                  # Batches of 10 reports, whatever the machine's speed: what a rank at 20 steps/s
                  # sends with the default 0.5 s flush, and the same evaluation points every run.
                  config=MonitorConfig(flush_interval_seconds=60.0, max_batch_reports=10, heartbeat_seconds=60.0),
                  strict=True, **setup.hints)
    if setup.optimizer is None:  # a Trainer's callback attaches (and closes) the monitor itself
        onset = setup.train(kwargs)
    else:
        monitor = attach(setup.model, setup.optimizer, **kwargs)
        onset = setup.train(monitor)
        monitor.close()
    hd.settle()
    return _score(scenario, seed, hd, recorder, scenario.onset if onset is None else onset, setup.steps, t0)


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _run_torchrun(scenario: Any, seed: int) -> Result:
    """A DDP case (``bench.faultzoo.ddp``): 2 ranks under torchrun report over HTTP to a healthd served here.

    The healthd is the zoo's (same settings and recorder) behind a real server: the ranks' reports take
    the route ``healthd serve`` gives them. After the job ends (its ranks sent their closing heartbeats),
    the server stops (which evaluates what it accepted) and one tick judges the ended job's job-scoped
    rules (RankDesync, StragglerRank) over its final windows.
    """
    from bench.faultzoo.ddp import WORLD
    from healthd.server.embedded import free_port, serve_in_thread

    recorder = FiringRecorder()
    hd = _zoo_healthd(recorder)
    job = f"zoo-{scenario.name}"
    root = Path(__file__).resolve().parents[2]
    t0 = time.perf_counter()
    with serve_in_thread(hd=hd) as server:
        env = {**os.environ, "HEALTHD_SERVER": server.url, "HEALTHD_JOB": job, "FAULTZOO_SEED": str(seed),
               "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
        cmd = [*_torchrun(), "--nproc-per-node", str(WORLD), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "bench.faultzoo.ddp", scenario.name]
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun {scenario.name} exited {proc.returncode}:\n"
                               f"{proc.stdout.decode(errors='replace')[-3000:]}{proc.stderr.decode(errors='replace')[-3000:]}")
    # Each rank's close() returns after its closing heartbeat was answered: the job's ranks are closed here.
    hd.settle()
    hd.tick()
    return _score(scenario, seed, hd, recorder, scenario.onset, scenario.ddp.steps, t0)


def _score(scenario: Any, seed: int, hd: Healthd, recorder: FiringRecorder, onset: int, steps: int,
           t0: float) -> Result:
    # severities can escalate after firing: take the final one
    for alert in hd.engine.alerts(f"zoo-{scenario.name}"):
        key = alert_key(alert.rule, alert.stream)
        if key in recorder.fired and alert.fired_at is not None:
            recorder.fired[key]["severity"] = alert.severity.value
    res = Result(name=scenario.name if seed == 0 else f"{scenario.name}@{seed}",
                 kind="control" if scenario.expected is None else "fault",
                 expected=scenario.expected, onset=onset, steps=steps, stream=getattr(scenario, "stream", None),
                 fired=recorder.fired, seconds=round(time.perf_counter() - t0, 2))
    stream = getattr(scenario, "stream", None)
    expected = None if scenario.expected is None else alert_key(scenario.expected, stream)
    if expected is not None and expected in recorder.fired:
        res.detected = True
        res.detect_step = recorder.fired[expected]["step"]
        res.steps_to_detect = None if res.detect_step is None else max(0, res.detect_step - onset)
    res.pages = pages(hd.engine.alerts(f"zoo-{scenario.name}"))
    res.false_alarms = sorted(r for r, a in recorder.fired.items()
                              if scenario.expected is None and Severity(a["severity"]).level > Severity.INFO.level)
    return res


def pages(alerts: Iterable[Alert]) -> list[str]:
    """The fired alerts above info that no firing cause explains (incident roots: what Alertmanager's
    inhibit rules leave), one per (rule, rank, stream); ``Rule[stream]``, with `` rank N`` when they
    come from more than one rank."""
    roots = {(a.rule, a.rank, a.stream) for a in alerts
             if a.fired_at is not None and a.caused_by is None and a.severity.level > Severity.INFO.level}
    ranks = {rank for _, rank, _ in roots}
    return sorted(alert_key(rule, stream) + (f" rank {rank}" if len(ranks) > 1 and rank is not None else "")
                  for rule, rank, stream in roots)


def summarize(results: Sequence[Result]) -> dict[str, Any]:
    faults = [r for r in results if r.kind == "fault"]
    controls = [r for r in results if r.kind == "control"]
    delays = [r.steps_to_detect for r in faults if r.steps_to_detect is not None]
    paged = [len(r.pages) for r in faults if r.detected]
    return {
        "faults": len(faults),
        "detected": sum(r.detected for r in faults),
        "recall": (sum(r.detected for r in faults) / len(faults)) if faults else None,
        "controls": len(controls),
        "false_alarms": sum(bool(r.false_alarms) for r in controls),
        "median_steps_to_detect": statistics.median(delays) if delays else None,
        "max_steps_to_detect": max(delays) if delays else None,
        # after incident grouping: the alerts above info Alertmanager would not inhibit (issue target: <= 2)
        "median_pages_per_detected_fault": statistics.median(paged) if paged else None,
        "max_pages_per_detected_fault": max(paged) if paged else None,
        "seconds": round(sum(r.seconds for r in results), 1),
    }


def format_row(r: Result) -> str:
    fired = ", ".join(f"{k}({v['severity'][0]}@{v['step']})" for k, v in sorted(r.fired.items())) or "-"
    if r.kind == "fault":
        verdict = f"detected at step {r.detect_step} (+{r.steps_to_detect})" if r.detected else "MISSED"
    else:
        verdict = "quiet" if not r.false_alarms else "FALSE ALARM: " + ", ".join(r.false_alarms)
    expected = "(control)" if r.expected is None else alert_key(r.expected, r.stream)
    return f"{r.name:<28} {expected:<26} {verdict:<32} {fired}"


def run(scenarios: Iterable[Any], out: Path | None = None, stream: Any = sys.stdout, seeds: int = 1) -> list[Result]:
    results = []
    print(f"{'scenario':<28} {'expected':<26} {'verdict':<32} alerts fired (severity@step)", file=stream)
    for sc in scenarios:
        for seed in range(seeds):
            r = run_one(sc, seed)
            results.append(r)
            print(format_row(r), file=stream, flush=True)
    s = summarize(results)
    print(f"recall {s['detected']}/{s['faults']} = {100 * (s['recall'] or 0):.0f}%, false alarms "
          f"{s['false_alarms']}/{s['controls']} controls, median steps to detect {s['median_steps_to_detect']} "
          f"(max {s['max_steps_to_detect']}), non-inhibited alerts above info per detected fault median "
          f"{s['median_pages_per_detected_fault']} (max {s['max_pages_per_detected_fault']}), {s['seconds']} s",
          file=stream)
    if out is not None:
        out.write_text(json.dumps({"summary": s, "results": [asdict(r) for r in results]}, indent=1))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    from bench.faultzoo.ddp import DDP_SCENARIOS
    from bench.faultzoo.finetune import FINE_TUNE_SCENARIOS
    from bench.faultzoo.multi import MULTI_SCENARIOS
    from bench.faultzoo.scenarios import SCENARIOS

    p = argparse.ArgumentParser(prog="python -m bench.faultzoo", description=__doc__)
    p.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    p.add_argument("--out", default=str(Path(__file__).with_name("results.json")), help="JSON result path")
    p.add_argument("--seeds", type=int, default=1, help="run each scenario with seeds 0..N-1 (default 1)")
    p.add_argument("--kind", choices=("all", "fault", "control"), default="all", help="faults, controls or both")
    p.add_argument("--doc", default=str(Path(__file__).resolve().parents[2] / "docs" / "faultzoo.md"),
                   help="the detection report generated from the run (empty: none)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # tiny models; the machine's cores are shared
    every: tuple[Any, ...] = (*SCENARIOS, *FINE_TUNE_SCENARIOS, *MULTI_SCENARIOS, *DDP_SCENARIOS)
    chosen = [s for s in every if (not args.only or s.name in args.only)
              and (args.kind == "all" or (s.expected is None) == (args.kind == "control"))]
    results = run(chosen, Path(args.out), seeds=args.seeds)
    if args.doc:
        from bench.faultzoo.report import write

        write(Path(args.out), Path(args.doc))
    return 0 if all(r.ok for r in results) else 1
