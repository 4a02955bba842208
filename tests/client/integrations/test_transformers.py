"""HealthdCallback for transformers: a real Trainer on a tiny BERT built from a config, against a real healthd."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from healthd.exposition import catalog as C
from healthd_client import MonitorConfig
from healthd_client.integrations.transformers import HealthdCallback
from tests.live import live_healthd

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model comes from a config
FAST = MonitorConfig(flush_interval_seconds=0.01, heartbeat_seconds=60.0, heavy_every_steps=4)
NAN_AT_STEP = 6


class Tokens(torch.utils.data.Dataset):
    """Random 12-token sequences; the label is whether token 5 appears."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 32, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": (self.ids[i] == 5).any().long()}


class CorruptEmbeddings(TrainerCallback):
    """The fault: from optimizer step ``at`` on, one embedding row is NaN (a bad checkpoint shard, an fp16 overflow)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step == self.at:
            with torch.no_grad():
                model.bert.embeddings.word_embeddings.weight[:, 0] = math.nan


def _train(tmp_path: Path, job: str, url: str, max_steps: int, *extra: TrainerCallback) -> HealthdCallback:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    callback = HealthdCallback(job, url, config=FAST, num_classes=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=1, eval_strategy="steps", eval_steps=5,
                             per_device_eval_batch_size=16, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=Tokens(160),
                      eval_dataset=Tokens(32), callbacks=[callback, *extra])
    trainer.train()
    return callback


def test_metrics_arrive_per_optimizer_step(tmp_path: Path) -> None:
    with live_healthd() as live:
        callback = _train(tmp_path, "hf-ok", live.url, 10)
        assert callback.monitor is not None and callback.monitor.closed
        data = httpx.get(f"{live.url}/v1/jobs/hf-ok/series").json()
        metrics = httpx.get(f"{live.url}/metrics").text

    steps = data["ranks"]["0"]["steps"]
    assert [s["step"] for s in steps] == list(range(10))
    # logging_steps=1: every step carries the loss the Trainer logged for it.
    assert all(math.isfinite(s["loss"]) and s["batch_size"] == 8 and s["grad_norm"] > 0 for s in steps)
    assert "bert.embeddings.word_embeddings" in steps[0]["layers"] and steps[0]["lr"][0] > 0
    assert any(s.get("update_ratio") for s in steps)
    evals = data["ranks"]["0"]["evals"]
    assert [e["step"] for e in evals] == [4, 9] and all(math.isfinite(e["loss"]) for e in evals)
    attach = data["attach"]
    assert attach["versions"]["transformers"] == transformers.__version__
    assert attach["hints"]["dataset_size"] == 160 and attach["optimizer"]["name"] == "AdamW"
    assert attach["model"]["param_count"] == sum(p.numel() for p in BertForSequenceClassification(
        BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=16, num_labels=2)).parameters())
    assert f'{C.LOSS.name}{{job="hf-ok",rank="0",stream=""}}' in metrics
    assert not [a for a in data["alerts"] if a["severity"] == "critical"]


def test_nan_weights_are_caught_at_their_step(tmp_path: Path) -> None:
    with live_healthd() as live:
        _train(tmp_path, "hf-nan", live.url, 9, CorruptEmbeddings(NAN_AT_STEP))
        alerts = httpx.get(f"{live.url}/v1/alerts", params={"job": "hf-nan"}).json()["alerts"]
    (nf,) = [a for a in alerts if a["rule"] == "NonFiniteValues"]
    assert nf["state"] == "firing" and nf["step"] == NAN_AT_STEP


def test_arguments_the_trainer_owns_are_refused() -> None:
    with pytest.raises(ValueError, match="rank is taken from TrainingArguments"):
        HealthdCallback("j", "http://127.0.0.1:1", rank=1)
