"""A fault-zoo scenario as an unmodified training script, for test_auto_attach_faults; run by it, not collected.

AUTO_SCENARIO names a function of ``bench.faultzoo.scenarios`` (``nan_input``, ``lr_too_high``,
``forgot_zero_grad``, ``ctrl_mlp``); its loop computes the loss with ``F.cross_entropy`` (a plain
function: auto-attach sees it as what ``backward()`` is called on). AUTO_EXPLICIT=1: the same program
with ``healthd_client.attach(model, optimizer)`` and ``monitor.step(loss=, batch_size=)`` / ``eval``,
as a user who edits the script would write it; otherwise the loop's monitor does nothing. Under torchrun
(WORLD_SIZE set) each rank joins a gloo process group and trains the scenario's model on its own (the
scenarios build their own model; ranks run the same data, so they stay in step).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from bench.faultzoo import scenarios


class Untouched:
    """What the loop calls when the script knows nothing of healthd."""

    def step(self, **kwargs: Any) -> None:
        pass

    def eval(self, **kwargs: Any) -> None:
        pass


def main() -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    setup = getattr(scenarios, os.environ["AUTO_SCENARIO"])()
    monitor: Any = Untouched()
    if os.environ.get("AUTO_EXPLICIT") == "1":
        import healthd_client

        monitor = healthd_client.attach(setup.model, setup.optimizer)
    setup.train(monitor)
    if os.environ.get("AUTO_EXPLICIT") == "1":
        monitor.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
