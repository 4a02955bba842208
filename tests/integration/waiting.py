"""Waiting on conditions, not clocks, for tests that run real jobs against an embedded healthd."""

from __future__ import annotations

import time
from collections.abc import Callable

from healthd.server.embedded import Embedded


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def after_ticks(hd: Embedded, ticks: int) -> None:
    """Wait until no rank's steps wait for their rules and the ticker has then run the job rules over
    every job ``ticks`` more times: what a test needs before asserting that nothing fired."""
    wait_for(lambda: len(hd.hd.queue) == 0, 30, "rank evaluations to catch up")
    # A tick counts one evaluation per job (Engine.on_tick_rule); with the queue empty and the
    # training processes gone, nothing else evaluates.
    target = hd.hd.engine.evaluation_count + ticks * len(hd.hd.store.jobs)
    wait_for(lambda: hd.hd.engine.evaluation_count >= target, 30, f"{ticks} engine ticks")
