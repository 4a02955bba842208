"""healthd_client.integrations.deepspeed on a one-rank DeepSpeed ZeRO engine (gloo, CPU), in process.

The two-rank jobs, compared with DeepSpeed's own full gradients and parameters, are
tests/integration/test_torchrun_deepspeed.py; here: what attach() resolves, that no optimizer hook is left
on the user's optimizer, that every step is measured from ``monitor.step()``, and what is declared not
measured. Needs ``deepspeed`` (skipped without it) and its JIT-compiled shared-memory op (see there).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from healthd.server.embedded import free_port
from tests.client.conftest import RecordingTransport, step_reports

deepspeed = pytest.importorskip("deepspeed")

from healthd_client.integrations.deepspeed import EngineStepped  # noqa: E402 (after the skip)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """One engine for the module: DeepSpeed keeps its process groups in globals, so a second process group
    in the same process is not one it can use."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "LOCAL_RANK": "0", "RANK": "0",
                            "WORLD_SIZE": "1"}.items():
            env.setenv(name, value)  # what a launcher sets, and DeepSpeed asks for
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                             world_size=1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        # Two parameter groups: DeepSpeed calls the torch optimizer once per group in engine.step()
        groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")]},
                  {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
        eng, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2),
            config={"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                    "train_micro_batch_size_per_gpu": 4})
        try:
            yield eng
        finally:
            torch.distributed.destroy_process_group()


def test_attach_measures_each_engine_step_from_monitor_step(engine: Any, make_monitor: Any,
                                                            transport: RecordingTransport) -> None:
    monitor = make_monitor(engine, engine.optimizer, config_kwargs={"heavy_every_steps": 1})
    inner = engine.optimizer.optimizer
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks
    norms = []
    for _ in range(3):
        x = torch.randn(4, 4)
        loss = (engine(x) - x.sum(1, keepdim=True)).square().mean()
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        monitor.step(loss=loss, batch_size=4)
    monitor.close(timeout=5.0)
    steps = step_reports(transport)
    assert sorted(steps) == [0, 1, 2]  # one step each, though the torch optimizer stepped twice each time
    assert [steps[s]["grad_norm"] for s in range(3)] == pytest.approx(norms, rel=1e-6)
    for s in steps.values():  # one rank holds the whole partition: its part is the job's value
        assert s["shard"]["count"] == 1 and s["shard"]["update_sq"] > 0 and s["shard"]["weight_sq"] > 0
    closing = transport.of_kind("heartbeat")[-1]
    assert {d["name"] for d in closing["disabled_quantities"]} == {
        "layer_stats", "non_finite_params", "param_fingerprint", "ddp_gradient_noise"}


def test_an_optimizer_that_is_not_the_engines_is_refused(engine: Any, make_monitor: Any) -> None:
    other = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="engine.optimizer"):
        make_monitor(engine, other)



def test_micro_batches_that_did_not_update_are_not_steps() -> None:
    engine = SimpleNamespace(global_steps=0)
    stepped = EngineStepped(engine)
    seen = []
    for micro in range(6):  # gradient accumulation over 3 micro-batches: updates after the 3rd and 6th
        engine.global_steps = (micro + 1) // 3
        seen.append(stepped())
    assert seen == [False, False, True, False, False, True]
