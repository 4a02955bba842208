"""HealthdCallback at the Trainer's defaults: each step's own loss (the model output's), never a substituted one."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from healthd_client import MonitorConfig
from healthd_client.integrations.transformers import HealthdCallback
from tests.client.conftest import RecordingTransport, step_reports
from tests.client.integrations.test_transformers import CorruptEmbeddings, Tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAST = MonitorConfig(flush_interval_seconds=0.01, heartbeat_seconds=60.0)


class Logs(TrainerCallback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def _train(tmp_path: Path, steps: int, *extra: TrainerCallback, **args: Any) -> dict[int, dict[str, Any]]:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    transport = RecordingTransport()
    callback = HealthdCallback("hf", config=FAST, num_classes=2, transport=transport)
    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8,
                              learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
                              disable_tqdm=True, dataloader_num_workers=0, **args)
    Trainer(model=BertForSequenceClassification(config), args=targs, train_dataset=Tokens(160),
            callbacks=[callback, *extra]).train()
    return step_reports(transport)


def test_default_logging_steps_still_gives_every_step_its_loss(tmp_path: Path) -> None:
    reports = _train(tmp_path, 6)  # logging_steps=500: the Trainer logs nothing in 6 steps
    assert sorted(reports) == list(range(6))
    assert all(math.isfinite(r["loss"]) for r in reports.values())


@pytest.mark.parametrize("accumulation", [1, 3])
def test_the_loss_is_the_steps_own(tmp_path: Path, accumulation: int) -> None:
    logs = Logs()
    reports = _train(tmp_path, 4, logs, logging_steps=1, gradient_accumulation_steps=accumulation,
                     logging_nan_inf_filter=False)
    # healthd reports the mean of the step's micro-batch losses (comparable with ln(C)); this
    # transformers version logs their sum under accumulation (2.08 = 3 x 0.69 at chance for 2 classes)
    for step, report in reports.items():
        assert report["loss"] == pytest.approx(logs.losses[step + 1] / accumulation, rel=1e-3, abs=1e-4)


def test_a_nan_loss_is_reported_as_nan_not_as_the_filtered_log(tmp_path: Path) -> None:
    logs = Logs()
    reports = _train(tmp_path, 8, CorruptEmbeddings(at=4), logs, logging_steps=1)  # nan_inf_filter on (default)
    assert all(math.isfinite(reports[s]["loss"]) for s in range(4))
    for s in range(4, 8):
        assert "loss" not in reports[s] or not math.isfinite(reports[s]["loss"]), reports[s].get("loss")
        assert reports[s]["nonfinite"]["loss"] == 1
    assert all(math.isfinite(v) for v in logs.losses.values())  # what the filter logged instead
