"""A real ``healthd serve`` in a subprocess, for tests that kill and restart it (kill -9, SIGTERM)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from healthd.server.embedded import free_port


class HealthdProcess:
    """``healthd serve --db DB`` on 127.0.0.1:PORT; the port and database survive restarts."""

    def __init__(self, workdir: Path, *, db: Path | None = None, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (key, certificate) PEM files: serve HTTPS with them (``--ssl-keyfile/--ssl-certfile``);
        ``verify`` is then an SSL context that trusts that certificate, for httpx."""
        self.workdir = workdir
        self.db = db or workdir / "healthd.sqlite"
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = True
        if tls:
            extra_args = (*extra_args, "--ssl-keyfile", str(tls[0]), "--ssl-certfile", str(tls[1]))
            self.verify = ssl.create_default_context(cafile=str(tls[1]))
        self.extra_args = extra_args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"healthd-{self.starts}.log"

    def start(self, timeout_seconds: float = 30.0) -> None:
        self.starts += 1
        cmd = [sys.executable, "-m", "healthd.tools.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--db", str(self.db), "--log-level", "warning", *self.extra_args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_seconds
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"healthd exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1, verify=self.verify).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"healthd did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout_seconds: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_seconds)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
