"""The DDP comm-hook wrapper on a real single-process gloo group: measurement, composition, refusal."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from healthd.server.embedded import free_port
from healthd_client.integrations.ddp import (
    FSDP1_REASON,
    SHARDED_REASON,
    DDPGradientNoise,
    register_comm_hook,
)
from healthd_client.quantities.base import QuantityContext
from healthd_client.quantities.sharding import ShardLayout
from tests.client.conftest import RecordingTransport, step_reports


@pytest.fixture
def ddp_model() -> Iterator[torch.nn.parallel.DistributedDataParallel]:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        yield torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)))
    finally:
        dist.destroy_process_group()


def run(model: torch.nn.Module, opt: torch.optim.Optimizer, monitor: Any, steps: int) -> list[float]:
    """Train; return the naive norm of the gradients after each backward (world size 1: local = reduced)."""
    naive = []
    for _ in range(steps):
        x = torch.randn(8, 6)
        opt.zero_grad()
        model(x).square().mean().backward()
        naive.append(math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters())))
        opt.step()
        monitor.step(loss=0.0, batch_size=8)
    return naive


def test_local_and_allreduced_norms_match_a_naive_reference(ddp_model: Any, make_monitor: Any,
                                                            transport: RecordingTransport) -> None:
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    monitor = make_monitor(ddp_model, opt)
    naive = run(ddp_model, opt, monitor, 4)
    monitor.close()
    reports = step_reports(transport)
    for i, expected in enumerate(naive):
        assert reports[i]["grad_norm_local"] == pytest.approx(expected, rel=1e-5)
        assert reports[i]["grad_norm_allreduced"] == pytest.approx(expected, rel=1e-5)
        assert reports[i]["comm_seconds"] >= 0


def test_user_hook_registered_after_attach_is_composed(ddp_model: Any, make_monitor: Any,
                                                       transport: RecordingTransport) -> None:
    calls = []

    def user_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls.append(state)
        return allreduce_hook(None, bucket)  # type: ignore[arg-type]

    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    monitor = make_monitor(ddp_model, opt)
    ddp_model.register_comm_hook("user-state", user_hook)  # would raise "only once" without composition
    run(ddp_model, opt, monitor, 3)
    monitor.close()
    assert calls and set(calls) == {"user-state"}
    assert all("grad_norm_local" in r for r in step_reports(transport).values())
    with pytest.raises(RuntimeError, match="built-in"):
        ddp_model._register_builtin_comm_hook(dist.BuiltinCommHookType.ALLREDUCE)


def test_register_comm_hook_helper_before_attach(ddp_model: Any, make_monitor: Any,
                                                 transport: RecordingTransport) -> None:
    calls = []

    def user_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls.append(1)
        return allreduce_hook(None, bucket)  # type: ignore[arg-type]

    register_comm_hook(ddp_model, None, user_hook)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    monitor = make_monitor(ddp_model, opt)
    run(ddp_model, opt, monitor, 2)
    monitor.close()
    assert calls and all("grad_norm_local" in r for r in step_reports(transport).values())


def test_foreign_hook_registered_before_attach_is_refused_clearly(ddp_model: Any, make_monitor: Any,
                                                                  transport: RecordingTransport) -> None:
    ddp_model.register_comm_hook(None, allreduce_hook)
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = make_monitor(ddp_model, opt)
    assert any("already has a communication hook" in str(w.message) for w in caught)
    run(ddp_model, opt, monitor, 2)  # training goes on with the user's hook
    monitor.close()
    reports = step_reports(transport)
    assert reports and all("grad_norm_local" not in r for r in reports.values())


def test_ddp_measures_the_noise_norms_without_degrading(ddp_model: Any, make_monitor: Any) -> None:
    """Under DDP the noise scale stays free: nothing is reported as not measured."""
    opt = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
    monitor = make_monitor(ddp_model, opt)
    assert "ddp_gradient_noise" not in monitor.disabled_quantities


class _Ctx:
    """What ``DDPGradientNoise.on_attach`` reads of a QuantityContext, and what it says through ``degrade``."""

    def __init__(self, model: torch.nn.Module, layout: ShardLayout | None) -> None:
        self.model = model
        self.plan = SimpleNamespace(layout=layout)
        self.degraded: list[tuple[str, str]] = []

    def degrade(self, quantity: Any, reason: str) -> None:
        self.degraded.append((quantity.name, reason))


@pytest.mark.parametrize(("layout", "reason"), [
    (ShardLayout(group=0, index=1, count=2), SHARDED_REASON),
    (ShardLayout(group=0, index=0, count=2, flat=frozenset({1})), FSDP1_REASON),
], ids=["fsdp2", "fsdp1"])
def test_a_sharded_model_says_why_it_has_no_noise_scale(layout: ShardLayout, reason: str) -> None:
    """FSDP/HSDP: no local gradient before the reduce-scatter; the quantity says so (MonitoringDegraded)
    instead of staying silent as it does on a single process."""
    q = DDPGradientNoise()
    ctx = _Ctx(torch.nn.Linear(2, 1), layout)
    q.on_attach(cast(QuantityContext, ctx))
    assert q.every_steps == 0 and ctx.degraded == [("ddp_gradient_noise", reason)]
    assert len(reason) <= 256  # the heartbeat's reason field keeps 256 characters


def test_a_single_process_model_has_no_noise_scale_silently() -> None:
    q = DDPGradientNoise()
    ctx = _Ctx(torch.nn.Linear(2, 1), None)
    q.on_attach(cast(QuantityContext, ctx))
    assert q.every_steps == 0 and ctx.degraded == []
