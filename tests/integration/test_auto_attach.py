"""Auto-attach on unmodified scripts, against a real healthd: ``healthd-run`` and HEALTHD_AUTO=1 alone,
one process and a 2-rank torchrun job (gloo, CPU).

"HEALTHD_AUTO=1 alone" needs the ``healthd_auto.pth`` start-up line in site-packages. The test venv
may be an editable install made before it existed, so these tests build a small venv (no pip) whose
site-packages holds that line and a ``.pth`` that adds the test venv's site-packages (torch).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from healthd.server.embedded import Embedded, free_port, serve_in_thread
from healthd.settings import Settings
from tests.integration.waiting import after_ticks, wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("auto_train.py")
PTH = REPO / "client" / "healthd_auto.pth"
STEPS = 30


@pytest.fixture(scope="module")
def healthd() -> Iterator[Embedded]:
    with serve_in_thread(Settings(engine={"tick_seconds": 0.25})) as hd:
        yield hd


@pytest.fixture(scope="module")
def auto_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python whose site-packages has healthd_auto.pth, and sees the test venv's packages."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shutil.copy(PTH, site / PTH.name)
    (site / "parent_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    return python


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHD_")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**base, "OMP_NUM_THREADS": "1", **extra}


def run(cmd: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def launcher(hd: Embedded, job: str) -> list[str]:
    return [sys.executable, "-m", "healthd_client.launcher", "--server", hd.url, "--job", job, "--"]


def torchrun(python: Path | str) -> list[str]:
    return [str(python), "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            f"--master-port={free_port()}"]


def wait_closed(hd: Embedded, job: str, ranks: list[int]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = hd.hd.store.jobs.get(job)
        if state is not None and sorted(state.ranks) == ranks and all(r.closed for r in state.ranks.values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job!r}: ranks {ranks} never all closed")


def alerts(hd: Embedded, job: str) -> list[str]:
    return [a["rule"] for a in httpx.get(f"{hd.url}/v1/alerts", params={"job": job}).json()["alerts"]]


def quiet(hd: Embedded, job: str) -> bool:
    after_ticks(hd, 4)  # every step evaluated, then the job rules run over the closed job a few times
    return alerts(hd, job) == []


def firing(hd: Embedded, job: str, rule: str) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if rule in alerts(hd, job):
            return True
        time.sleep(0.25)
    return False


def check_reports(hd: Embedded, job: str, ranks: list[int]) -> None:
    wait_closed(hd, job, ranks)
    state = hd.hd.store.jobs[job]
    assert state.meta.world_size == len(ranks)
    for rank in ranks:
        steps = state.ranks[rank].steps
        assert [s.step for s in steps] == list(range(STEPS))  # one monitor: each step once
        assert all(s.loss is not None for s in steps)  # read from the nn.MSELoss module
        assert all(s.batch_size == 32 for s in steps)


def test_launcher_single_process_healthy_is_quiet(healthd: Embedded) -> None:
    job = "auto-launcher-single"
    done = run([*launcher(healthd, job), sys.executable, str(SCRIPT)], env(AUTO_STEPS=str(STEPS)))
    check_reports(healthd, job, [0])
    assert quiet(healthd, job)
    assert "healthd" not in done.stderr  # no warning


def test_env_alone_single_process_nan_fires_non_finite(healthd: Embedded, auto_python: Path) -> None:
    job = "auto-env-nan"
    run([str(auto_python), str(SCRIPT)],
        env(HEALTHD_AUTO="1", HEALTHD_SERVER=healthd.url, HEALTHD_JOB=job, AUTO_STEPS=str(STEPS), AUTO_NAN_AT="12"))
    check_reports(healthd, job, [0])
    assert firing(healthd, job, "NonFiniteValues")


def test_launcher_torchrun_two_ranks(healthd: Embedded) -> None:
    job = "auto-launcher-ddp"
    run([*launcher(healthd, job), *torchrun(sys.executable), str(SCRIPT)], env(AUTO_STEPS=str(STEPS)))
    check_reports(healthd, job, [0, 1])
    assert quiet(healthd, job)


def test_env_alone_torchrun_two_ranks(healthd: Embedded, auto_python: Path) -> None:
    job = "auto-env-ddp"
    run([*torchrun(auto_python), str(SCRIPT)],
        env(HEALTHD_AUTO="1", HEALTHD_SERVER=healthd.url, HEALTHD_JOB=job, AUTO_STEPS=str(STEPS)))
    check_reports(healthd, job, [0, 1])
    assert quiet(healthd, job)


def test_explicit_attach_wins_one_monitor(healthd: Embedded) -> None:
    job = "auto-explicit"
    done = run([*launcher(healthd, job), sys.executable, str(SCRIPT)],
               env(AUTO_STEPS=str(STEPS), AUTO_EXPLICIT="1"))
    wait_closed(healthd, job, [0])
    # The script's own monitor (it never calls monitor.step: no loss), and no second one.
    assert [s.step for s in healthd.hd.store.jobs[job].ranks[0].steps] == list(range(STEPS))
    assert "already has a monitor" not in done.stderr


def test_env_alone_gan_reports_a_stream_per_optimizer(healthd: Embedded, auto_python: Path) -> None:
    job = "auto-env-gan"
    done = run([str(auto_python), str(SCRIPT.with_name("auto_gan_train.py"))],
               env(HEALTHD_AUTO="1", HEALTHD_SERVER=healthd.url, HEALTHD_JOB=job, AUTO_STEPS=str(STEPS)))

    def closed() -> bool:
        state = healthd.hd.store.jobs.get(job)
        return state is not None and set(state.streams) == {"generator", "discriminator"} and all(
            r.closed for sub in state.streams.values() for r in sub.ranks.values())

    wait_for(closed, 20, f"job {job!r}: both streams closed")
    state = healthd.hd.store.jobs[job]
    assert not state.ranks  # no unnamed stream: each optimizer has its own
    for name in ("generator", "discriminator"):
        steps = state.streams[name].ranks[0].steps
        assert [s.step for s in steps] == list(range(STEPS))
        assert all(s.loss is not None and 0 < s.loss < 10 for s in steps)  # the true BCE, never a scaled one
    after_ticks(healthd, 4)
    assert "MissingZeroGrad" not in alerts(healthd, job)
    assert "not monitored" not in done.stderr
