"""HealthdCallback(stop_on=...) for Lightning: a NaN stops a real Trainer through trainer.should_stop."""

from __future__ import annotations

import time

import torch

from healthd_client import FiringAlert
from healthd_client.integrations.lightning import HealthdCallback
from tests.client.integrations.test_lightning import FAST, NAN_FROM_STEP, TinyClassifier, _loader
from tests.live import live_healthd

MAX_STEPS = 400


class Working(TinyClassifier):
    """TinyClassifier whose steps take as long as a real model's would (well, 10 ms)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(0.01)
        return super().training_step(batch, batch_idx)


def test_a_nan_sets_should_stop_after_the_checkpoint_callback() -> None:
    import lightning.pytorch as pl

    torch.manual_seed(0)
    checkpoints: list[tuple[FiringAlert, int]] = []
    with live_healthd() as live:
        trainer = pl.Trainer(max_steps=MAX_STEPS, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, num_sanity_val_steps=0)
        callback = HealthdCallback("lit-stop", live.url, config=FAST, stop_on=("NonFiniteValues",),
                                   on_stop=lambda alert: checkpoints.append((alert, trainer.global_step)))
        trainer.callbacks.append(callback)
        trainer.fit(Working(nan_from=NAN_FROM_STEP), _loader(320))
    [(alert, at_step)] = checkpoints
    assert (alert.rule, alert.job, alert.step) == ("NonFiniteValues", "lit-stop", NAN_FROM_STEP)
    assert trainer.should_stop and NAN_FROM_STEP <= trainer.global_step <= NAN_FROM_STEP + 50
    assert callback.monitor is not None and callback.monitor.stopped_by == alert and callback.monitor.closed
    print(f"Lightning stopped at global_step {trainer.global_step}, NaN from {NAN_FROM_STEP}")
