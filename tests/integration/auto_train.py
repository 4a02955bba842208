"""A training script that knows nothing of healthd, for the auto-attach tests; run by them, not collected.

Linear regression as in ddp_train.py (a setup the rules find healthy), with the loss from an
``nn.MSELoss`` module (auto-attach reads the loss from it). Under torchrun
(WORLD_SIZE set) it runs DDP on gloo. Environment: AUTO_STEPS, AUTO_NAN_AT (a NaN input at that
step), AUTO_EXPLICIT=1 (the script also calls healthd_client.attach, as a script with its own
attach would).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

D = 32
BATCH = 32


def main() -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    w_star = torch.randn(D)
    model: torch.nn.Module = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + torch.full((D,), D ** -0.5)).unsqueeze(0))
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if os.environ.get("AUTO_EXPLICIT") == "1":
        import healthd_client

        healthd_client.attach(model, opt)
    criterion = torch.nn.MSELoss()
    nan_at = int(os.environ.get("AUTO_NAN_AT", "-1"))
    gen = torch.Generator().manual_seed(int(os.environ.get("RANK", "0")))
    for step in range(int(os.environ.get("AUTO_STEPS", "30"))):
        x = torch.randn(BATCH, D, generator=gen)
        y = (x @ w_star).unsqueeze(1)
        if step == nan_at:
            x[0, 0] = float("nan")
        loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
