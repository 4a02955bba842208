"""A real HAProxy in front of healthd shards, run from deploy/haproxy/haproxy.cfg (tests/integration)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx

from healthd.server.embedded import free_port
from tests.integration.servers import require_binary, wait_until

REPO = Path(__file__).resolve().parents[2]
DEPLOY_CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
SHARD_HEADER = "X-Healthd-Shard"  # the deployed config names the answering shard in it


def shard_config(shards: dict[int, str]) -> str:
    """The deployed config with its server lines replaced by ``shards`` (id -> host:port): the same
    frontend, balance and checks, with shards added or removed as an operator would."""
    text = DEPLOY_CONFIG.read_text()
    servers = "".join(f'    server shard{i} "{addr}" id {i}\n' for i, addr in sorted(shards.items()))
    replaced, n = re.subn(r"(    server shard\d+ .*\n)+", servers, text)
    assert n == 1, "deploy/haproxy/haproxy.cfg: expected one block of shard server lines"
    return replaced


class HaproxyProcess:
    """``haproxy -db -f CONFIG`` on 127.0.0.1:PORT until ``stop``; ``url`` is the proxy's."""

    def __init__(self, workdir: Path, config: str, name: str = "haproxy") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / f"{name}.cfg"
        self.config_path.write_text(config)
        self.log_path = workdir / f"{name}.log"
        binary = require_binary("haproxy")
        env = {**os.environ, "HEALTHD_PROXY_BIND": f"127.0.0.1:{self.port}"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env)

    def wait_routing(self, servers: int) -> None:
        """Until the proxy answers through ``servers`` distinct shards (its health checks passed)."""
        seen: set[str] = set()

        def routed() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log()}")
            answer = httpx.get(self.url + "/healthz", timeout=2)
            if answer.status_code == 200 and SHARD_HEADER in answer.headers:
                seen.add(answer.headers[SHARD_HEADER])
            return len(seen) >= servers

        wait_until(routed, timeout_seconds=30, interval_seconds=0.05, what="haproxy routing to every shard",
                   log=self.log)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
