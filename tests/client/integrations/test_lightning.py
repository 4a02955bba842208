"""HealthdCallback for Lightning: a real Trainer on CPU reporting to a real healthd (granian)."""

from __future__ import annotations

import math

import httpx
import lightning.pytorch as pl
import pytest
import torch

from healthd.exposition import catalog as C
from healthd_client import MonitorConfig
from healthd_client.integrations.lightning import HealthdCallback
from tests.live import live_healthd

FAST = MonitorConfig(flush_interval_seconds=0.01, heartbeat_seconds=60.0, heavy_every_steps=5)
NAN_FROM_STEP = 12


class TinyClassifier(pl.LightningModule):
    """An MLP on a synthetic 3-class task; from optimizer step ``nan_from`` on, a NaN enters the batch."""

    def __init__(self, nan_from: int | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.nan_from = nan_from

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.nan_from is not None and self.global_step >= self.nan_from:
            x = x.clone()
            x[0, 0] = math.nan  # a corrupt sample
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader(n: int, batch_size: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def _fit(module: pl.LightningModule, callback: HealthdCallback, max_steps: int, accumulate: int = 1) -> None:
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                         limit_val_batches=2, val_check_interval=10, num_sanity_val_steps=1, callbacks=[callback])
    trainer.fit(module, _loader(320), _loader(32))


def test_metrics_arrive_with_the_gradients_of_the_step_they_belong_to() -> None:
    torch.manual_seed(0)
    with live_healthd() as live:
        module = TinyClassifier()
        callback = HealthdCallback("lit-ok", live.url, config=FAST, num_classes=3)
        _fit(module, callback, max_steps=20, accumulate=2)
        assert callback.monitor is not None and callback.monitor.closed
        data = httpx.get(f"{live.url}/v1/jobs/lit-ok/series").json()
        metrics = httpx.get(f"{live.url}/metrics").text

    steps = data["ranks"]["0"]["steps"]
    assert [s["step"] for s in steps] == list(range(20))  # one report per optimizer step, not per micro-batch
    assert all(s["batch_size"] == 8 and math.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps)
    # Opened in on_before_optimizer_step, i.e. after backward: step 0 already has gradients for every layer.
    first = steps[0]["layers"]
    assert set(first) == {"net.0", "net.2"} and all(v["grad_norm"] > 0 for v in first.values())
    assert steps[0]["lr"] == [0.1] and any(s.get("update_ratio") for s in steps)
    assert data["global_batch_size"] == 16  # 8 examples x 2 accumulated micro-batches x 1 rank
    attach = data["attach"]
    assert attach["versions"]["lightning"] == pl.__version__ and attach["hints"]["grad_accumulation_steps"] == 2
    assert attach["hints"]["dataset_size"] == 320 and attach["model"]["param_count"] == 8 * 16 + 16 + 16 * 3 + 3
    assert attach["optimizer"]["name"] == "SGD"
    # Sanity check skipped; validation every 10 batches = every 5 optimizer steps, at the last completed step.
    evals = data["ranks"]["0"]["evals"]
    assert [e["step"] for e in evals] == [4, 9, 14, 19] and all(math.isfinite(e["loss"]) for e in evals)
    assert all(0 <= e["accuracy"] <= 1 for e in evals)
    assert f'{C.GRAD_NORM.name}{{job="lit-ok",rank="0",stream=""}}' in metrics
    assert not [a for a in data["alerts"] if a["severity"] == "critical"]


def test_a_nan_in_the_batch_is_caught_at_its_step() -> None:
    torch.manual_seed(0)
    with live_healthd() as live:
        _fit(TinyClassifier(nan_from=NAN_FROM_STEP), HealthdCallback("lit-nan", live.url, config=FAST), max_steps=16)
        alerts = httpx.get(f"{live.url}/v1/alerts", params={"job": "lit-nan"}).json()["alerts"]
    (nf,) = [a for a in alerts if a["rule"] == "NonFiniteValues"]
    assert nf["state"] == "firing" and nf["step"] == NAN_FROM_STEP


def test_arguments_the_trainer_owns_are_refused() -> None:
    with pytest.raises(ValueError, match="world_size is taken from the Trainer"):
        HealthdCallback("j", "http://127.0.0.1:1", world_size=2)
    with pytest.raises(ValueError, match="val_loss_key"):
        HealthdCallback("j", "http://127.0.0.1:1", val_loss_key="")
