"""GET /v1/jobs/{job}/series and GET /v1/jobs/{job} on a real server (granian, as `healthd serve`)."""

from __future__ import annotations

import math

from tests.healthd.run_data import JOB, NAN_STEP, post_run
from tests.live import LiveHealthd


def test_series_returns_the_stored_windows_and_alerts(healthd_server: LiveHealthd) -> None:
    post_run(healthd_server)
    r = healthd_server.get(f"/v1/jobs/{JOB}/series")
    assert r.status_code == 200
    data = r.json()
    assert data["job"] == JOB and data["world_size"] == 2 and data["global_batch_size"] == 64
    assert sorted(data["ranks"]) == ["0", "1"]
    r0 = data["ranks"]["0"]
    assert [s["step"] for s in r0["steps"]] == list(range(50))  # initial steps and window merged, no duplicates
    assert math.isnan(r0["steps"][NAN_STEP]["loss"]) and r0["steps"][0]["layers"]["head"]["update_ratio"] > 0
    assert [e["step"] for e in r0["evals"]] == [10, 20, 30] and len(r0["gpu"]) == 8
    assert len(data["ranks"]["1"]["steps"]) == 30
    assert data["attach"]["model"]["layers"][0]["name"] == "encoder.0"
    (nf,) = [a for a in data["alerts"] if a["rule"] == "NonFiniteValues"]
    assert nf["step"] == NAN_STEP and nf["rank"] == 0 and nf["advice"]


def test_job_view_has_the_setup_and_batch_size(healthd_server: LiveHealthd) -> None:
    post_run(healthd_server)
    job = healthd_server.get(f"/v1/jobs/{JOB}").json()
    assert job["global_batch_size"] == 64 and job["ranks"] == [0, 1]
    assert job["attach"]["optimizer"]["hyperparams"] == {"lr": 0.001, "weight_decay": 0.01}
    assert job["attach"]["git_commit"].startswith("0123456789")


def test_series_of_unknown_job_is_404(healthd_server: LiveHealthd) -> None:
    r = healthd_server.get("/v1/jobs/nobody/series")
    assert r.status_code == 404 and "nobody" in r.json()["error"]
