"""A tiny real training run on the CPU (torch MLP + healthd_client) for the integration tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import healthd_client
from healthd_client import MonitorConfig

FAST = MonitorConfig(flush_interval_seconds=0.1, heavy_every_steps=1, heartbeat_seconds=1.0)


@dataclass
class Run:
    """Model, optimizer, data and an attached monitor; ``step()`` trains one batch."""

    job: str
    server: str
    config: MonitorConfig = FAST
    lr: float = 0.05
    momentum: float = 0.9  # 0 for the spike test: momentum would carry the spike into later updates
    seed: int = 0
    transport: Any = None  # a healthd_client Transport; None: HTTP to ``server``
    step_index: int = 0
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.x = torch.randn(512, 16, generator=g)
        self.y = (self.x[:, :4].argmax(dim=1)).long()
        torch.manual_seed(self.seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.monitor = healthd_client.attach(self.model, self.optimizer, job=self.job, server=self.server,
                                             num_classes=4, dataset_size=len(self.x), config=self.config,
                                             transport=self.transport)

    def step(self, *, nan_input: bool = False, grad_scale: float = 1.0,
             before_step: Callable[[Run], Any] | None = None) -> float:
        """One step. ``nan_input``: a corrupt sample (the loop then skips the update, as guarded loops do);
        ``grad_scale``: multiply the gradients (an injected spike) and skip the update for that step."""
        i = self.step_index % 16
        xb, yb = self.x[i * 32:(i + 1) * 32].clone(), self.y[i * 32:(i + 1) * 32]
        if nan_input:
            xb[0, 0] = math.nan
        self.optimizer.zero_grad()
        loss = self.loss_fn(self.model(xb), yb)
        loss.backward()
        if grad_scale != 1.0:
            saved = [g["lr"] for g in self.optimizer.param_groups]
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(grad_scale)
            for g in self.optimizer.param_groups:
                g["lr"] = 0.0
            self.optimizer.step()
            for g, lr in zip(self.optimizer.param_groups, saved, strict=True):
                g["lr"] = lr
        elif torch.isfinite(loss):
            self.optimizer.step()
        self.monitor.step(loss=loss, batch_size=len(xb))
        self.step_index += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def eval(self) -> None:
        with torch.no_grad():
            out = self.model(self.x[:128])
            loss = float(self.loss_fn(out, self.y[:128]))
            acc = float((out.argmax(1) == self.y[:128]).float().mean())
        self.monitor.eval(loss=loss, accuracy=acc)

    def close(self) -> None:
        self.monitor.close()
