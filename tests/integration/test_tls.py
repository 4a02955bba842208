"""``healthd serve`` over TLS (``--ssl-keyfile/--ssl-certfile``, passed to granian), as the README documents it."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.healthd_process import HealthdProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def hd(tmp_path: Path) -> Iterator[HealthdProcess]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    proc = HealthdProcess(tmp_path, tls=(key, cert))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_reports_alerts_and_metrics_over_https_on_one_connection(hd: HealthdProcess) -> None:
    assert hd.url.startswith("https://")
    steps = [{"kind": "step", "job": "tls", "rank": 0, "time": 1.0, "step": i, "loss": 1.0, "grad_norm": 1.0,
              "lr": [0.01], "nonfinite": {"loss": 1} if i == 10 else {}, **({"loss": math.nan} if i == 10 else {})}
             for i in range(12)]
    with httpx.Client(base_url=hd.url, verify=hd.verify, timeout=10) as client:
        for i in range(0, 12, 3):  # keep-alive: every request on the same TLS connection
            r = client.post("/v1/reports", content=json.dumps({"schema_version": 1, "reports": steps[i:i + 3]}))
            assert r.status_code == 200 and r.json()["accepted"] == 3 and r.json()["rejected"] == []
        alerts = client.get("/v1/alerts", params={"job": "tls"}).json()["alerts"]
        metrics = client.get("/metrics")
    assert [(a["rule"], a["state"]) for a in alerts] == [("NonFiniteValues", "firing")]
    assert metrics.status_code == 200 and 'job="tls"' in metrics.text
    with pytest.raises(httpx.HTTPError):  # and it is TLS: plain HTTP on that port gets no answer
        httpx.get(hd.url.replace("https://", "http://") + "/healthz", timeout=5)
