"""healthd report: fetched from a real healthd over HTTP, rendered to one self-contained HTML file."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from healthd.tools.cli import main
from healthd.tools.report import ReportError, fetch_series, render_report
from tests.healthd.run_data import JOB, NAN_STEP, post_run
from tests.live import LiveHealthd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_cli_writes_a_self_contained_report(healthd_server: LiveHealthd, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    post_run(healthd_server)
    out = tmp_path / "report.html"
    assert main(["report", "--job", JOB, "--server", healthd_server.url, "--out", str(out)]) == 0
    page = out.read_text()
    assert str(out) in capsys.readouterr().out
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # loss, grad norm, update ratio per layer, lr, GPU memory, GPU utilisation
    assert len(images) == 6 and all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing loaded from elsewhere
    (row,) = re.findall(r'<tr class="alert" data-rule="NonFiniteValues">.*?</tr>', page)
    assert f"step {NAN_STEP}" in row and "rank 0" in row and "critical" in row
    assert "encoder.0" in page and "40×24" in page and "AdamW" in page and "0123456789abcdef" in page


def test_report_of_unknown_job_or_server_is_an_error(healthd_server: LiveHealthd) -> None:
    with pytest.raises(ReportError, match="no job named 'ghost'"):
        fetch_series(healthd_server.url, "ghost")
    assert main(["report", "--job", "ghost", "--server", healthd_server.url, "--out", "/dev/null"]) == 1


def test_a_job_without_steps_still_renders() -> None:
    page = render_report({"job": "j", "ranks": {}, "alerts": [], "attach": None})
    assert "No step data stored" in page and "No alerts fired" in page and "no attach report" in page
