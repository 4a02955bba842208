"""HealthdCallback with several optimizers: a stream each, in manual optimization, on a real Trainer and healthd."""

from __future__ import annotations

from typing import Any

import httpx
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families

from healthd.exposition import catalog as C
from healthd_client.integrations.lightning import HealthdCallback
from tests.client.integrations.test_lightning import FAST
from tests.live import live_healthd

BATCHES = 8


class TinyGAN(pl.LightningModule):
    """The alternating GAN of the tutorials in manual optimization; ``critic_steps`` discriminator steps per batch."""

    def __init__(self, critic_steps: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.Tanh())
        self.disc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.critic_steps = critic_steps
        self.losses: dict[str, list[torch.Tensor]] = {"generator": [], "discriminator": []}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        optimizers = self.optimizers()
        assert isinstance(optimizers, list)
        opt_g, opt_d = optimizers
        (real,) = batch
        n = len(real)
        for _ in range(self.critic_steps):
            fake = self.gen(torch.randn(n, 4)).detach()
            loss_d = (F.binary_cross_entropy_with_logits(self.disc(real), torch.ones(n, 1))
                      + F.binary_cross_entropy_with_logits(self.disc(fake), torch.zeros(n, 1)))
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            self.losses["discriminator"].append(loss_d.detach())
        loss_g = F.binary_cross_entropy_with_logits(self.disc(self.gen(torch.randn(n, 4))), torch.ones(n, 1))
        opt_g.zero_grad()
        self.manual_backward(loss_g)  # through the discriminator: its gradients wait for its zero_grad
        opt_g.step()
        self.losses["generator"].append(loss_g.detach())
        return None

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.gen.parameters(), lr=2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(self.disc.parameters(), lr=2e-4, betas=(0.5, 0.999))]


class TwoOptimizersAutomatic(TinyGAN):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = True

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.disc(batch[0]).mean()


def _fit(module: pl.LightningModule, callback: HealthdCallback) -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(BATCHES * 8, 8, generator=g) * 2 - 1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))


def _last_losses(text: str, job: str) -> dict[str, float]:
    return {s.labels.get("stream", ""): s.value for fam in text_string_to_metric_families(text)
            if fam.name == C.LOSS.name for s in fam.samples if s.labels["job"] == job}


def test_a_manual_gan_reports_each_optimizer_on_its_stream_with_its_own_loss() -> None:
    torch.manual_seed(0)
    module = TinyGAN(critic_steps=2)
    with live_healthd() as live:
        callback = HealthdCallback("lit-gan", live.url, config=FAST, loss_kind="adversarial",
                                   streams=("generator", "discriminator"))
        _fit(module, callback)
        assert set(callback.monitors) == {"generator", "discriminator"}
        assert all(m.closed for m in callback.monitors.values())
        job = httpx.get(f"{live.url}/v1/jobs/lit-gan").json()
        metrics = httpx.get(f"{live.url}/metrics").text
        alerts = httpx.get(f"{live.url}/v1/alerts", params={"job": "lit-gan"}).json()["alerts"]

    # Two critic steps per batch: each optimizer.step() is a step of its own stream, the unnamed one stays empty.
    assert job["streams"] == {"discriminator": {"ranks": [0], "last_step": 2 * BATCHES - 1},
                              "generator": {"ranks": [0], "last_step": BATCHES - 1}}
    assert job["ranks"] == []
    # Each stream's loss is the one its optimizer stepped on (read from manual_backward, no host sync).
    last = _last_losses(metrics, "lit-gan")
    assert last["generator"] == pytest.approx(float(module.losses["generator"][-1]), rel=1e-5)
    assert last["discriminator"] == pytest.approx(float(module.losses["discriminator"][-1]), rel=1e-5)
    assert not [a for a in alerts if a["severity"] == "critical"], alerts


def test_several_optimizers_are_named_by_index_by_default() -> None:
    torch.manual_seed(0)
    with live_healthd() as live:
        callback = HealthdCallback("lit-idx", live.url, config=FAST)
        _fit(TinyGAN(), callback)
        job = httpx.get(f"{live.url}/v1/jobs/lit-idx").json()
    assert {k: v["last_step"] for k, v in job["streams"].items()} == {"optimizer_0": BATCHES - 1,
                                                                       "optimizer_1": BATCHES - 1}


def test_automatic_optimization_with_two_optimizers_is_lightnings_error_and_attaches_nothing() -> None:
    """Lightning 2 refuses several optimizers under automatic optimization before training starts."""
    callback = HealthdCallback("lit-auto", "http://127.0.0.1:1", config=FAST)
    with pytest.raises(RuntimeError, match="multiple optimizers is only supported with manual optimization"):
        _fit(TwoOptimizersAutomatic(), callback)
    assert callback.monitors == {} and callback.monitor is None


@pytest.mark.parametrize(("streams", "match"), [("gen", "sequence of names"), ({0: "a", 1: "a"}, "differently"),
                                                ({-1: "a"}, "sequence of names")])
def test_bad_streams_are_refused(streams: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HealthdCallback("j", "http://127.0.0.1:1", streams=streams)
    with pytest.raises(ValueError, match="not both"):
        HealthdCallback("j", "http://127.0.0.1:1", streams=("a",), stream="b")


def test_under_a_grad_scaler_each_stream_reports_the_true_loss() -> None:
    """Lightning hands ``on_before_backward`` the scaled loss (``MixedPrecision.pre_backward``); the callback
    divides it by the scale. On CPU ``precision="16-mixed"`` gets no scaler from Lightning 2.6, so the plugin is
    built with one, as a GPU run's ``16-mixed`` is."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from tests.client.conftest import RecordingTransport

    torch.manual_seed(0)
    module = TinyGAN()
    transport = RecordingTransport()
    callback = HealthdCallback("lit-amp", "http://unused", config=FAST, transport=transport,
                               streams=("generator", "discriminator"))
    scaler = torch.amp.GradScaler("cpu")
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(BATCHES * 8, 8, generator=g) * 2 - 1)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert scaler.is_enabled()
    for name in ("generator", "discriminator"):
        reported = [s["loss"] for s in transport.of_kind("step") if s.get("stream") == name]
        assert reported == pytest.approx([float(v) for v in module.losses[name]], rel=1e-5)  # not 65536x
