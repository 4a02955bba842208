"""deploy/haproxy and deploy/nginx: the proxies that shard healthd by job check their own configs
(``haproxy -c``, ``nginx -t``); tests/integration/test_sharding.py runs the HAProxy one for real."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.integration.servers import require_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_haproxy_config_is_valid_and_hashes_by_job() -> None:
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert "balance hdr(X-Healthd-Job)" in text and "hash-type consistent" in text
    env = {**os.environ, "HEALTHD_PROXY_BIND": "127.0.0.1:9184",
           **{f"HEALTHD_SHARD{i}": f"127.0.0.1:{9184 + i}" for i in (1, 2, 3)}}
    done = subprocess.run([require_binary("haproxy"), "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_nginx_config_is_valid_and_hashes_by_job(tmp_path: Path) -> None:
    nginx = require_binary("nginx")  # `make system-deps` installs nginx-light
    conf = DEPLOY / "nginx" / "healthd.conf"
    assert "hash $healthd_job consistent;" in conf.read_text()
    main = tmp_path / "nginx.conf"
    main.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
                    f"http {{ include {conf}; }}\n")
    done = subprocess.run([nginx, "-t", "-c", str(main)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
