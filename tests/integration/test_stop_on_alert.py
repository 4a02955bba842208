"""Closing the loop: a real training run against a real healthd stops a few steps after a NaN.

The run attaches with ``stop_on=("NonFiniteValues",)`` and an ``on_stop`` checkpoint; each push's
answer (``IngestResult.alerts``) carries healthd's verdict back, and the step after it arrives raises
``TrainingStopped``. A healthy run with the same policy trains to the end.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import healthd_client
from healthd_client import FiringAlert, MonitorConfig, TrainingStopped
from tests.live import LiveHealthd, live_healthd

NAN_AT = 30
STEPS = 200
# A step of this tiny model is well under a millisecond; real steps take 100 ms or more. The sleep stands
# for the step's work, so that "steps to stop" counts what a user would see, not this machine's speed.
STEP_WORK_SECONDS = 0.01
MAX_STEPS_TO_STOP = 50  # a round trip is a few ms; the bound leaves room for a loaded machine


def _train(live: LiveHealthd, job: str, nan_at: int | None) -> tuple[int | None, list[FiringAlert]]:
    """Train up to STEPS steps; return the step that raised TrainingStopped (None: it ran to the end)
    and what on_stop was given."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    checkpoints: list[FiringAlert] = []
    monitor = healthd_client.attach(model, optimizer, job=job, server=live.url, stop_on=("NonFiniteValues",),
                                    on_stop=checkpoints.append, config=MonitorConfig(heartbeat_seconds=60.0))
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(STEPS, 16, 8, generator=g)
    y_all = (x_all[..., 0] > 0).long() + (x_all[..., 1] > 1).long()
    stopped_at = None
    try:
        for step in range(STEPS):
            x = x_all[step].clone()
            if nan_at is not None and step >= nan_at:
                x[0, 0] = math.nan  # a corrupt sample from here on
            try:  # optimizer.step() raises it (before the update) or monitor.step(), whichever comes first
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y_all[step])
                loss.backward()
                optimizer.step()
                monitor.step(loss=loss, batch_size=len(x))
            except TrainingStopped as stop:
                stopped_at = step
                assert stop.alert.rule == "NonFiniteValues" and "NonFiniteValues" in str(stop)
                break
            time.sleep(STEP_WORK_SECONDS)
    finally:
        monitor.close()
    return stopped_at, checkpoints


@pytest.mark.timeout(180)
def test_a_nan_stops_the_run_within_a_few_steps_and_a_healthy_run_never_stops() -> None:
    with live_healthd() as live:
        stopped_at, checkpoints = _train(live, "nan-run", NAN_AT)
        assert stopped_at is not None, "the run was not stopped"
        assert NAN_AT <= stopped_at <= NAN_AT + MAX_STEPS_TO_STOP
        [alert] = checkpoints
        assert (alert.rule, alert.job, alert.rank, alert.step) == ("NonFiniteValues", "nan-run", 0, NAN_AT)
        print(f"stopped {stopped_at - NAN_AT} steps after the NaN")

        stopped_at, checkpoints = _train(live, "healthy-run", None)
        assert (stopped_at, checkpoints) == (None, [])
