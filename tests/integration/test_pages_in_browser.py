"""The status page (GET /) and a `healthd report` file, rendered by a real headless Chromium.

Chromium is Debian's ``chromium`` (``make system-deps`` installs it). Each page
is loaded twice: ``--dump-dom`` gives the DOM after rendering (the alerts must
be in it), ``--screenshot`` a PNG (checked to be a real, non-blank image; the
ones in docs/ were looked at by a person).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from healthd.tools.cli import main
from tests.healthd.run_data import JOB, post_run
from tests.live import live_healthd

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.integration

if CHROMIUM is None:  # make test installs it; a bare `pytest` on a machine without it must say why it fails
    raise RuntimeError("these tests need Debian's chromium: run `make system-deps` (apt-get install chromium)")


def chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct bytes in the first rows (a blank page has ~1)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat = b"".join(data[i + 8:i + 8 + struct.unpack(">I", data[i:i + 4])[0]]
                    for i in [m.start() - 4 for m in re.finditer(b"IDAT", data)])
    raw = zlib.decompress(idat)
    return width, height, len(set(raw[: min(len(raw), 400_000)]))


def test_status_page_renders_jobs_and_alerts(tmp_path: Path) -> None:
    with live_healthd() as live:
        post_run(live)
        dom = chromium(tmp_path, "--dump-dom", live.url + "/")
        shot = tmp_path / "status.png"
        chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", live.url + "/")
    assert f"<h2>{JOB} " in dom
    assert re.search(r'<tr class="alert" data-rule="NonFiniteValues" data-state="firing">', dom)
    w, h, colours = png_size_and_colours(shot)
    assert (w, h) == (1280, 900) and colours > 20
    if os.environ.get("HEALTHD_KEEP_SCREENSHOTS"):
        shutil.copy(shot, os.environ["HEALTHD_KEEP_SCREENSHOTS"] + "/status-page.png")


def test_report_renders_plots_and_alerts(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    with live_healthd() as live:
        post_run(live)
        assert main(["report", "--job", JOB, "--server", live.url, "--out", str(report)]) == 0
    # The file is opened after healthd is gone: it must be self-contained.
    dom = chromium(tmp_path, "--dump-dom", report.as_uri())
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri())
    assert re.search(r'<tr class="alert" data-rule="NonFiniteValues">', dom)
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', dom)) == 6
    w, h, colours = png_size_and_colours(shot)
    assert (w, h) == (1200, 2400) and colours > 20
    if os.environ.get("HEALTHD_KEEP_SCREENSHOTS"):
        shutil.copy(shot, os.environ["HEALTHD_KEEP_SCREENSHOTS"] + "/report.png")
