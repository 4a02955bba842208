"""The job keeps working while attached: checkpoints, copies, torch.compile.

Nothing healthd installs lives on the user's modules (``ForwardTap`` uses global hooks for sampled
steps only), so ``torch.save``/``weights_only`` loads, ``deepcopy`` and state dicts work while attached
and after ``close()``; and a compiled model compiles as often with healthd as without it.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import healthd_client
from tests.client.conftest import FAST, RecordingTransport, step_reports


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
            torch.nn.Linear(32, 32), torch.nn.Sigmoid(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


MODULE_CLASSES = [MLP, torch.nn.Sequential, torch.nn.Linear, torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid]


def attach(model, optimizer, transport, every=2, **kwargs):
    config = healthd_client.MonitorConfig(**FAST, inspect_every_steps=every, inspect_first_steps=1)
    return healthd_client.attach(model, optimizer, job="j", transport=transport, config=config, strict=True,
                                 **kwargs)


def train(model, optimizer, monitor, steps, micro_batches=1):
    torch.manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(micro_batches):
            loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,)))
            loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss=loss)


def hooks_on(model: torch.nn.Module) -> int:
    """Module hooks, which torch.save and deepcopy carry along."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def tensor_hooks_on(model: torch.nn.Module) -> int:
    """Gradient hooks on parameters (StaleGrads has one each; torch.save and deepcopy drop them)."""
    return sum(len(p._backward_hooks or {}) for p in model.parameters())


def round_trips(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals(MODULE_CLASSES):
        loaded = torch.load(buf, weights_only=True)
    assert isinstance(loaded, MLP) and hooks_on(loaded) == 0 and tensor_hooks_on(loaded) == 0
    twin = MLP()
    twin.load_state_dict(model.state_dict())
    model.load_state_dict(twin.state_dict())
    pickle.loads(pickle.dumps(optimizer))
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    buf.seek(0)
    optimizer.load_state_dict(torch.load(buf, weights_only=True))


def global_hooks() -> int:
    """Global forward hooks in the process (a monitor another test left open may hold some)."""
    return len(torch.nn.modules.module._global_forward_hooks) + len(torch.nn.modules.module._global_forward_pre_hooks)


def test_checkpoints_copies_and_reattach_work_while_attached_and_after_close():
    others = global_hooks()
    transport = RecordingTransport()
    model = MLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = attach(model, optimizer, transport)
    train(model, optimizer, monitor, 3)  # ends armed for a sampled step: the worst moment to save
    assert hooks_on(model) == 0
    round_trips(model, optimizer)

    copied = copy.deepcopy(model)
    assert hooks_on(copied) == 0 and tensor_hooks_on(copied) == 0
    copied_opt = torch.optim.AdamW(copied.parameters(), lr=1e-3)
    train(copied, copied_opt, None, 3)  # the copy's forwards must not reach the original's monitor
    train(model, optimizer, monitor, 1)

    monitor.close()  # sends everything measured: what was reported is now all there
    reports = step_reports(transport)
    assert sorted(reports) == [0, 1, 2, 3]  # the original's 4 steps; the copy's 3 made none
    assert all(r["activations"] for r in reports.values() if "activations" in r)
    assert hooks_on(model) == 0 and tensor_hooks_on(model) == 0
    assert global_hooks() == others
    assert len(optimizer._optimizer_step_pre_hooks) == 0
    round_trips(model, optimizer)

    again = attach(model, optimizer, transport)
    train(model, optimizer, again, 2)
    again.close()
    assert global_hooks() == others


def test_sampled_steps_still_measure_activations_inputs_and_loss_inputs():
    transport = RecordingTransport()
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = attach(model, optimizer, transport, every=3)
    train(model, optimizer, monitor, 6)
    monitor.close()
    steps = step_reports(transport)
    sampled = [s for s, r in steps.items() if "inputs" in r]
    assert sampled == [0, 2, 5]
    for s in sampled:
        assert set(steps[s]["activations"]) == {"body.1", "body.3", "body.5", "body.7"}
        assert steps[s]["loss_inputs"][0]["fn"] == "cross_entropy"
    assert abs(steps[0]["inputs"]["mean"]) < 1.0
    assert all("activations" not in steps[s] and "loss_inputs" not in steps[s] for s in steps if s not in sampled)


def _compile_runs(with_healthd: bool, backend, micro_batches: int, steps: int = 60) -> tuple[int, dict]:
    torch.compiler.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return backend(gm, example_inputs)

    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transport = RecordingTransport()
    monitor = attach(model, optimizer, transport, every=5) if with_healthd else None
    compiled = torch.compile(model, backend=counting)
    with warnings.catch_warnings():
        # torch warns once that a global hook exists when the wrapper is first called on a sampled step
        warnings.filterwarnings("ignore", message=".*global hooks.*", category=UserWarning)
        train(compiled, optimizer, monitor, steps, micro_batches)
    if monitor is not None:
        monitor.close()
    torch.compiler.reset()
    return len(graphs), step_reports(transport)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_torch_compile_compiles_as_often_with_healthd_as_without(micro_batches):
    def eager(gm, example_inputs):
        return gm.forward

    without, _ = _compile_runs(False, eager, micro_batches)
    with_healthd, steps = _compile_runs(True, eager, micro_batches)
    assert with_healthd == without == 1  # one graph: no recompile, no graph break
    assert len(steps) == 60
    sampled = [s for s, r in steps.items() if "loss_inputs" in r]
    assert sampled == [s for s in range(60) if s < 1 or (s + 1) % 5 == 0]
    assert all("inputs" in steps[s] for s in sampled)  # read from the compiled wrapper's call


def _counted_training(with_healthd: bool, compiled: str, steps: int = 60, backend="eager", first_steps: int = 1):
    """Train the MLP ``steps`` steps with the model (``compiled="model"``: ``model.compile()``) or the
    whole training step (``compiled="step"``: ``torch.compile(train_step)``) compiled; return the graphs
    the backend compiled, the final parameters, the step reports and the closing heartbeat."""
    torch.compiler.reset()
    counter = CompileCounterWithBackend(backend)
    torch.manual_seed(0)
    model = MLP()
    if compiled == "model":
        model.compile(backend=counter)  # before attach, as most programs do
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transport = RecordingTransport()
    monitor = None
    if with_healthd:
        config = healthd_client.MonitorConfig(**FAST, inspect_every_steps=5, inspect_first_steps=first_steps,
                                              heavy_every_steps=3)
        monitor = healthd_client.attach(model, optimizer, job="j", transport=transport, config=config, strict=True)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    step = torch.compile(train_step, backend=counter) if compiled == "step" else train_step
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # healthd's own warnings (a failed quantity)
        warnings.filterwarnings("error", message=".*global hooks", category=UserWarning)
        for _ in range(steps):
            loss = step(torch.randn(8, 16), torch.randint(0, 4, (8,)))
            if monitor is not None:
                monitor.step(loss=loss, batch_size=8)
    heartbeat: dict = {}
    if monitor is not None:
        monitor.close()
        heartbeat = transport.of_kind("heartbeat")[-1]
    torch.compiler.reset()
    return counter.frame_count, [p.detach().clone() for p in model.parameters()], step_reports(transport), heartbeat


def _assert_same_training_and_still_measured(without, with_healthd, steps=60):
    assert len(with_healthd[1]) == len(without[1])
    for a, b in zip(without[1], with_healthd[1], strict=True):
        torch.testing.assert_close(a, b)
    reports = with_healthd[2]
    assert sorted(reports) == list(range(steps))
    assert all(r["grad_norm"] > 0 and r["loss"] > 0 for r in reports.values())
    assert [s for s, r in reports.items() if "update_ratio" in r] == list(range(0, steps, 3))
    # forward and loss ran inside graphs: the inspections say they are blind instead of reporting nothing
    assert all(k not in r for r in reports.values() for k in ("activations", "inputs", "loss_inputs"))
    degraded = {d["name"]: d["reason"] for d in with_healthd[3]["disabled_quantities"]}
    assert set(degraded) == {"activations", "inputs", "loss_inputs"}
    assert all("compile" in reason for reason in degraded.values())


def test_model_compiled_in_place_compiles_as_often_with_healthd_as_without():
    without = _counted_training(False, "model")
    with_healthd = _counted_training(True, "model")
    assert with_healthd[0] == without[0] == 1  # one graph: no recompile, no graph break
    _assert_same_training_and_still_measured(without, with_healthd)


def test_compiled_training_step_compiles_as_often_with_healthd_as_without():
    without = _counted_training(False, "step")
    # inspect_first_steps=0: nothing is armed at attach, so the step's first graphs are built as without healthd
    with_healthd = _counted_training(True, "step", first_steps=0)
    assert with_healthd[0] == without[0]  # backward already splits the step in two graphs
    _assert_same_training_and_still_measured(without, with_healthd)


def test_compiled_training_step_with_the_default_first_inspections_compiles_once_more_at_most():
    without = _counted_training(False, "step", steps=12)
    with_healthd = _counted_training(True, "step", steps=12, first_steps=3)
    # the loss inspection armed at attach is on the stack when step 0's graph is built; once the
    # compiled step is seen, nothing is armed again: one graph rebuilt at step 1, then none
    assert without[0] <= with_healthd[0] <= without[0] + 1
    _assert_same_training_and_still_measured(without, with_healthd, steps=12)


def test_torch_compile_wrapper_warns_nothing_and_says_activations_are_not_seen():
    transport = RecordingTransport()
    model = MLP()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # as `python -W error::UserWarning` would
        warnings.filterwarnings("ignore", message="Profiler function", category=UserWarning)
        monitor = attach(model, optimizer, transport, every=2)  # the inner model: the tap finds the wrapper
        train(compiled, optimizer, monitor, 4)
        monitor.close()
    torch.compiler.reset()
    steps = step_reports(transport)
    assert [s for s, r in steps.items() if "inputs" in r] == [0, 1, 3]  # read from the wrapper's call
    assert all("activations" not in r for r in steps.values())
    (degraded,) = transport.of_kind("heartbeat")[-1]["disabled_quantities"]
    assert degraded["name"] == "activations" and "torch.compile" in degraded["reason"]


@pytest.mark.parametrize("backend", ["inductor"])
def test_compiled_model_and_step_with_inductor(backend):
    without = _counted_training(False, "step", steps=8, backend=backend)
    with_healthd = _counted_training(True, "step", steps=8, backend=backend, first_steps=0)
    assert with_healthd[0] == without[0]
    _assert_same_training_and_still_measured(without, with_healthd, steps=8)
