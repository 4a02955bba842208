"""An alternating GAN that knows nothing of healthd, for test_auto_attach; run by it, not collected.

The tutorial's form: the discriminator steps first on a real and a fake batch, then the generator's loss
flows back through the discriminator. Two Adam optimizers; auto-attach makes one stream for each.
Environment: AUTO_STEPS.
"""

from __future__ import annotations

import os

import torch
from torch import nn

BATCH = 32


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    torch.manual_seed(0)
    g, d = Generator(), Discriminator()
    opt_g, opt_d = torch.optim.Adam(g.parameters(), 2e-4), torch.optim.Adam(d.parameters(), 2e-4)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(int(os.environ.get("AUTO_STEPS", "30"))):
        real, z = torch.randn(BATCH, 8) * 0.5 + 1.0, torch.randn(BATCH, 4)
        opt_d.zero_grad()
        fake = g(z)
        loss_d = bce(d(real), torch.ones(BATCH, 1)) + bce(d(fake.detach()), torch.zeros(BATCH, 1))
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad()
        loss_g = bce(d(fake), torch.ones(BATCH, 1))
        loss_g.backward()
        opt_g.step()


if __name__ == "__main__":
    main()
