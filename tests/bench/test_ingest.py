"""bench/ingest.py runs end to end at a toy size (its numbers are not checked: this machine is shared)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.ingest import _cpu_times, _steal_pct
from tests.integration.servers import require_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_every_target_serves_its_load_and_reports_what_the_readme_quotes() -> None:
    out = subprocess.run(
        [sys.executable, "bench/ingest.py", "--ranks", "16", "--seconds", "3", "--warmup-seconds", "0.5",
         "--prefill-steps", "32", "--scrape-seconds", "0.5", "--targets",
         "bare,bare-rsgi,healthd,healthd-asgi,validate,parse"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=True).stdout
    rows = {line.split()[0]: dict(kv.split("=") for kv in line.split()[1:])
            for line in out.splitlines() if "reports_per_second=" in line}
    assert set(rows) == {"bare", "bare-rsgi", "healthd", "healthd-asgi", "validate", "parse"}, out
    for target, row in rows.items():
        assert float(row["failed_requests"]) == 0 and float(row["requests"]) > 0, (target, out)
        assert float(row["reports_per_second"]) > 0 and float(row["p99_ms"]) >= float(row["p50_ms"]) > 0
        assert 0 <= float(row["server_cpu_steal_pct"]) <= 100
    healthd = rows["healthd"]
    assert float(healthd["rank_evaluations_per_s"]) > 0 and float(healthd["scrape_ms_max"]) > 0, out
    assert "healthd / bare = " in out and "healthd / bare-rsgi = " in out


def test_steal_is_read_from_proc_stat_for_the_server_core() -> None:
    before = _cpu_times(0)
    sum(range(200_000))
    after = _cpu_times(0)
    assert after[1] >= before[1] > 0 and after[0] >= before[0] >= 0
    assert _steal_pct((5, 100), (15, 200)) == 10.0


def test_two_shards_behind_haproxy_both_receive_reports() -> None:
    """``--shards 2``: the proxy (deploy/haproxy/haproxy.cfg's settings) spreads the jobs over both shards;
    each shard's own /v1/jobs holds some of them, and no request failed."""
    require_binary("haproxy")
    out = subprocess.run(
        [sys.executable, "bench/ingest.py", "--shards", "2", "--ranks", "32", "--seconds", "2",
         "--warmup-seconds", "0.5", "--scrape-seconds", "0", "--connections", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=True).stdout
    rows = {line.split()[0]: dict(kv.split("=") for kv in line.split()[1:])
            for line in out.splitlines() if "reports_per_second=" in line}
    row = rows["shards-2"]
    assert float(row["failed_requests"]) == 0 and float(row["requests"]) > 0, out
    for shard in ("shard1", "shard2"):
        assert float(row[f"reports_{shard}"]) > 0 and float(row[f"jobs_{shard}"]) > 0, out
    assert "share this machine's" in out  # the output says the numbers are not isolated
