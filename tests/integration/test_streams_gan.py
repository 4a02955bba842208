"""A real alternating GAN loop, two monitors under one job name (stream="generator"/"discriminator",
loss_kind="adversarial"), against a real healthd and a real Prometheus: quiet at warning and above when
the loop is right; a missing zero_grad on the discriminator is MissingZeroGrad, critical, on that stream."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import healthd_client
from healthd_client import MonitorConfig
from tests.client.conftest import FAST
from tests.integration.servers import prometheus, wait_until
from tests.live import LiveHealthd, live_healthd

JOB = "gan"
STEPS = 40


def _gan_loop(server: str, *, skip_d_zero_grad: bool = False) -> None:
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh())
    d = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 2e-4), torch.optim.Adam(d.parameters(), 2e-4)
    cfg = MonitorConfig(**FAST)
    mon_g = healthd_client.attach(g, opt_g, JOB, server, stream="generator", loss_kind="adversarial", config=cfg)
    mon_d = healthd_client.attach(d, opt_d, JOB, server, stream="discriminator", loss_kind="adversarial", config=cfg)
    bce = nn.BCEWithLogitsLoss()
    try:
        for _ in range(STEPS):
            real, z = torch.randn(32, 8) * 0.5 + 1.0, torch.randn(32, 4)
            if not skip_d_zero_grad:
                opt_d.zero_grad()
            fake = g(z)
            loss_d = bce(d(real), torch.ones(32, 1)) + bce(d(fake.detach()), torch.zeros(32, 1))
            loss_d.backward()
            opt_d.step()
            mon_d.step(loss=loss_d, batch_size=32)
            opt_g.zero_grad()
            loss_g = bce(d(fake), torch.ones(32, 1))
            loss_g.backward()
            opt_g.step()
            mon_g.step(loss=loss_g, batch_size=32)
    finally:
        mon_g.close(timeout=10.0)
        mon_d.close(timeout=10.0)


def _settled_alerts(live: LiveHealthd) -> list[dict[str, Any]]:
    """The job's alerts once healthd received every step of both streams and evaluated them."""
    def done() -> bool:
        streams = live.get(f"/v1/jobs/{JOB}").json().get("streams", {})
        return all(streams.get(s, {}).get("last_step") == STEPS - 1 for s in ("generator", "discriminator")) and \
            "healthd_rank_evaluations_pending 0.0" in live.get("/metrics").text
    wait_until(done, timeout_seconds=60)
    alerts: list[dict[str, Any]] = live.get("/v1/alerts", params={"job": JOB}).json()["alerts"]
    return alerts


def test_a_right_gan_loop_is_quiet_and_each_stream_has_its_series_in_prometheus() -> None:
    with live_healthd() as live:
        _gan_loop(live.url)
        alerts = _settled_alerts(live)
        loud = [a for a in alerts if a["severity"] in ("warning", "critical")]
        assert not loud, loud
        with prometheus([live.url]) as prom:
            got = prom.wait_for(f'trainhealth_step{{job="{JOB}"}}', timeout_seconds=60)
            streams = {r["metric"].get("stream") for r in got}
            assert streams == {"generator", "discriminator"}, got


def test_a_missing_discriminator_zero_grad_is_critical_on_that_stream_within_3_steps() -> None:
    with live_healthd() as live:
        _gan_loop(live.url, skip_d_zero_grad=True)
        alerts = _settled_alerts(live)
        mzg = [a for a in alerts if a["rule"] == "MissingZeroGrad"]
        assert [(a["stream"], a["severity"]) for a in mzg] == [("discriminator", "critical")], alerts
        assert mzg[0]["step"] is not None and mzg[0]["step"] <= 3, mzg
