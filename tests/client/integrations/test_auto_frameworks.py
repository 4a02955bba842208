"""Auto-attach on unmodified Lightning and Hugging Face ``Trainer`` runs (HEALTHD_AUTO=1 in one process):
steps are reported with their loss; with healthd's own callback in the run, the callback's monitor is
the only one. The multi-process runs and the fault comparison: tests/integration/test_auto_attach*.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from healthd_client import MonitorConfig, auto
from healthd_client.integrations import lightning as lightning_callback
from healthd_client.integrations import transformers as transformers_callback
from tests.client.conftest import FAST, RecordingTransport
from tests.client.integrations.test_lightning import TinyClassifier, _loader
from tests.client.integrations.test_transformers import Tokens
from tests.client.test_auto import armed, transport

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STEPS = 8

__all__ = ["armed", "transport"]  # auto-attach armed in this process, as tests/client/test_auto.py arms it


def fit_lightning(callbacks: list[pl.Callback]) -> None:
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks)
    trainer.fit(TinyClassifier(), _loader(320))


def train_transformers(tmp_path: Path, callbacks: list[TrainerCallback]) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=Tokens(160),
            callbacks=callbacks).train()


def reported_steps(a: auto.AutoAttach, transport: RecordingTransport) -> list[dict[str, object]]:
    assert a.monitor is not None and not a.failed
    a.monitor.close()
    return transport.of_kind("step")


def test_an_unmodified_lightning_run_reports_its_steps(armed: auto.AutoAttach, transport: RecordingTransport) -> None:
    fit_lightning([])
    steps = reported_steps(armed, transport)
    # Lightning runs training_step inside optimizer.step(closure): the first step shows auto-attach the
    # model only once it ran, so monitoring starts at the next one.
    assert len(steps) >= STEPS - 1
    assert all(isinstance(s["loss"], float) and math.isfinite(s["loss"]) for s in steps)


def test_an_unmodified_transformers_run_reports_its_steps(armed: auto.AutoAttach, transport: RecordingTransport,
                                                          tmp_path: Path) -> None:
    train_transformers(tmp_path, [])
    steps = reported_steps(armed, transport)
    assert [s["step"] for s in steps] == list(range(STEPS))
    assert all(isinstance(s["loss"], float) and math.isfinite(s["loss"]) and s.get("batch_size") == 8 for s in steps)


def test_lightning_callback_wins_one_monitor(armed: auto.AutoAttach, transport: RecordingTransport) -> None:
    mine = RecordingTransport()
    fit_lightning([lightning_callback.HealthdCallback("lit-own", transport=mine, config=MonitorConfig(**FAST))])
    assert armed.done and armed.monitor is None and transport.reports() == []
    assert {r["job"] for r in mine.reports()} == {"lit-own"} and len(mine.of_kind("step")) == STEPS


def test_transformers_callback_wins_one_monitor(armed: auto.AutoAttach, transport: RecordingTransport,
                                                tmp_path: Path) -> None:
    mine = RecordingTransport()
    train_transformers(tmp_path, [transformers_callback.HealthdCallback("hf-own", transport=mine,
                                                                        config=MonitorConfig(**FAST))])
    assert armed.done and armed.monitor is None and transport.reports() == []
    assert {r["job"] for r in mine.reports()} == {"hf-own"} and len(mine.of_kind("step")) == STEPS


def test_an_unmodified_lightning_gan_under_a_grad_scaler_reports_true_losses_per_stream(
        armed: auto.AutoAttach, transport: RecordingTransport) -> None:
    """Manual optimization, two optimizers, ``MixedPrecision`` with a GradScaler: Lightning's
    ``scaler.step(optimizer)`` drives each step, so auto-attach divides each captured root by the scale."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from tests.client.integrations.test_lightning_streams import BATCHES, TinyGAN

    torch.manual_seed(0)
    module = TinyGAN()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(BATCHES * 8, 8, generator=g) * 2 - 1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    # The generator ran before the discriminator's first step; torch's Sequential names no role.
    assert list(armed.monitors) == ["optimizer_0", "optimizer_1"] and not armed.failed
    assert armed.monitors["optimizer_0"]._model is module.disc and armed.monitors["optimizer_1"]._model is module.gen
    armed.close()
    steps = transport.of_kind("step")
    for stream, name in (("optimizer_0", "discriminator"), ("optimizer_1", "generator")):
        reported = [s["loss"] for s in steps if s.get("stream") == stream]
        assert reported == pytest.approx([float(v) for v in module.losses[name]], rel=1e-5)
