"""``healthd-run``: run a command unchanged with healthd attached to every training process it starts.

It only sets the environment and execs the command (it is not a parent process, so signals, exit
codes and job control are the command's own): HEALTHD_AUTO=1, HEALTHD_SERVER, HEALTHD_JOB (one name
for all ranks, chosen here when not given), HEALTHD_TOKEN and HEALTHD_STOP_ON if given, and PYTHONPATH with
``healthd_client/autostart`` first, whose ``sitecustomize`` arms auto-attach even where the
``healthd_auto.pth`` start-up line is not installed. Children inherit all of it: torchrun's workers,
a plain ``python train.py``, Ray workers started from the same environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from healthd_client.alerts import ALERT_NAME
from healthd_client.identity import label_safe

AUTOSTART_DIR = Path(__file__).resolve().with_name("autostart")

_EPILOG = """\
examples:
  healthd-run --job gpt2-sweep-7 --server http://127.0.0.1:9184 -- \\
      torchrun --nproc-per-node 2 train.py --lr 3e-4
  HEALTHD_SERVER=http://healthd:9184 healthd-run -- python train.py

The same without the launcher (a Kubernetes Job, a Slurm script), with the package installed:
  HEALTHD_AUTO=1 HEALTHD_SERVER=http://healthd:9184 HEALTHD_JOB=gpt2-sweep-7 torchrun ... train.py

In every Python process of the command that imports torch, each optimizer that steps gets a
monitor (model: the module holding its parameters; rank and world size from torchrun, Ray, Slurm or
RANK/WORLD_SIZE). One optimizer reports on the job's unnamed stream; several (a GAN's generator and
discriminator, actor and critic) report one stream each, named after the model's class or
optimizer_<n> (at most 8); their losses are judged as adversarial (not expected to go down),
unless HEALTHD_LOSS_KIND=minimized. Under torch.amp.GradScaler the loss reported is the unscaled one.
A script that calls healthd_client.attach (or uses healthd's Lightning / Hugging Face callback)
keeps its own monitors, and auto-attach adds none.
With --stop-on (or HEALTHD_STOP_ON=NonFiniteValues,ExplodingGradients), when healthd reports one
of those alerts for the job, the next optimizer.step() in every monitored process raises
healthd_client.TrainingStopped, as attach(stop_on=...) does: the run ends with an error naming the
alert instead of training on. Unset, alerts only go to healthd and Alertmanager.
Processes that never step an optimizer are left alone; a failure inside auto-attach is logged once
and the job runs as if healthd were absent.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="healthd-run",
        description="Run COMMAND unchanged, with healthd attached to every PyTorch training process it starts.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--server", default=None,
                   help="healthd's URL, e.g. http://127.0.0.1:9184 (default: $HEALTHD_SERVER; required)")
    p.add_argument("--job", default=None,
                   help="job name shared by all ranks (default: $HEALTHD_JOB, else the script's name and start time)")
    p.add_argument("--token", default=None,
                   help="bearer token for healthd (default: $HEALTHD_TOKEN; prefer the variable: arguments show in ps)")
    p.add_argument("--stop-on", default=None, metavar="ALERT[,ALERT...]",
                   help="stop training (TrainingStopped at the next optimizer step) when healthd reports one of "
                        "these alerts, e.g. NonFiniteValues (default: $HEALTHD_STOP_ON; none)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    return p


def default_job(command: Sequence[str], now: float | None = None) -> str:
    """The script's name (the first ``*.py`` argument, else the program's) and the launch time, label-safe."""
    script = next((Path(a).stem for a in command if a.endswith(".py")), Path(command[0]).name if command else "job")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return (label_safe(f"{script}-{stamp}").lstrip("_.:/@+-") or f"job-{stamp}")[:128]


def environment(args: argparse.Namespace, command: Sequence[str], base: Mapping[str, str]) -> dict[str, str]:
    """The command's environment: ``base`` plus what auto-attach reads."""
    env = dict(base)
    server = args.server or env.get("HEALTHD_SERVER")
    if not server:
        raise ValueError("--server or HEALTHD_SERVER is required, e.g. --server http://127.0.0.1:9184")
    env["HEALTHD_AUTO"] = "1"
    env["HEALTHD_SERVER"] = server
    env["HEALTHD_JOB"] = args.job or env.get("HEALTHD_JOB") or default_job(command)
    if args.token:
        env["HEALTHD_TOKEN"] = args.token
    if args.stop_on is not None:
        names = [n for n in args.stop_on.replace(",", " ").split() if n]
        bad = [n for n in names if not ALERT_NAME.match(n)]
        if bad:
            raise ValueError(f"--stop-on takes alert names such as NonFiniteValues, got {bad[0]!r}")
        env["HEALTHD_STOP_ON"] = ",".join(names)
    # Our sitecustomize first. (Not site-packages itself: before the standard library it could shadow it.)
    paths = [str(AUTOSTART_DIR), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``healthd-run``: exec the command; returns only on a usage error."""
    p = parser()
    args = p.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        p.error("no command given: healthd-run [options] -- COMMAND [ARGS...]")
    try:
        env = environment(args, command, os.environ)
    except ValueError as exc:
        p.error(str(exc))
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"healthd-run: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
