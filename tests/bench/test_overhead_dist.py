"""bench/overhead.py --dist (FSDP2 vs DDP, torchrun jobs of 2 ranks) runs at a toy size and prints every field.

Its numbers are not checked (this machine is shared); only that each arm ran, the monitored arms measured
something, and the summary names what the bench promises: step times, paired overhead, the monitor's memory
with the RSS cross-check, and the load average.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "overhead.py"


def test_dist_fsdp2_vs_ddp_prints_every_field_at_a_toy_size(tmp_path: Path) -> None:
    out_json = tmp_path / "dist.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--dist", "fsdp2,ddp", "--dist-size", "toy", "--rounds", "1", "--blocks", "1",
         "--block-steps", "1", "--warmup", "1", "--json", str(out_json)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    head = r"TinyGPT\(.*\), batch \d+ per rank, \d+ params, 2 ranks \(gloo, CPU, 1 thread each\), 1 rounds of 1x1 steps"
    assert re.match(head, lines[0]), lines
    for strategy in ("fsdp2", "ddp"):
        line = next(line for line in lines if line.startswith(f"{strategy}: "))
        for field in ("step ms none", "monitored", "overhead", "monitor memory", "rss growth diff", "max rss diff",
                      "not measured"):
            assert field in line, (field, line)
    assert lines[-1].startswith("load average before ("), lines
    dist = json.loads(out_json.read_text())["dist"]
    for strategy in ("fsdp2", "ddp"):
        assert dist[strategy]["none_ms"] > 0 and dist[strategy]["monitored_ms"] > 0
        assert dist[strategy]["monitor_memory_bytes"] > 0  # the monitored arm attached and holds its samples
    row = dist["rows"][0]
    assert set(row) == {"fsdp2-none", "fsdp2-monitored", "ddp-none", "ddp-monitored"}
    assert all(len(arm["ranks"]) == 2 and arm["ranks"][0]["reports_bytes"] > 0 for name, arm in row.items()
               if name.endswith("-monitored"))
