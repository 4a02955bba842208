"""healthd_client.auto / bootstrap / launcher in one process: model and loss found, explicit attach wins,
failures stay inside, the launcher's environment. Real jobs: tests/integration/test_auto_attach.py."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import healthd_client
from healthd_client import MonitorConfig, auto, bootstrap, launcher
from tests.client.conftest import FAST, RecordingTransport
from tests.client.test_monitor_alerts import NAN_ALERT, Answering

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def transport() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
def armed(transport: RecordingTransport, monkeypatch: pytest.MonkeyPatch) -> Iterator[auto.AutoAttach]:
    monkeypatch.setenv("HEALTHD_SERVER", "http://unused")
    monkeypatch.setenv("HEALTHD_JOB", "auto-unit")
    a = auto.AutoAttach(attach=functools.partial(healthd_client.attach, transport=transport),
                        config=MonitorConfig(**FAST))
    a.install()
    try:
        yield a
    finally:
        a.close()


def loop(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    criterion = torch.nn.MSELoss()
    for _ in range(steps):
        x = torch.randn(8, 4)
        loss = criterion(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model(torch.randn(3, 4))  # an evaluation forward: not counted in the batch size


def test_attaches_to_the_model_with_loss_and_batch_size(armed: auto.AutoAttach, transport: RecordingTransport) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loop(model, opt, 5)
    assert armed.monitor is not None and armed.monitor._model is model
    armed.monitor.close()
    steps = transport.of_kind("step")
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    assert all(s["batch_size"] == 8 and s["loss"] > 0 for s in steps)
    assert transport.of_kind("attach")[0]["job"] == "auto-unit"


def test_explicit_attach_before_the_first_step_wins(armed: auto.AutoAttach, transport: RecordingTransport,
                                                     recwarn: pytest.WarningsRecorder) -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mine = healthd_client.attach(model, opt, job="mine", transport=transport, config=MonitorConfig(**FAST))
    loop(model, opt, 3)
    assert armed.done and armed.monitor is None
    mine.close()
    assert {r["job"] for r in transport.reports()} == {"mine"}
    assert not [w for w in recwarn if "already has a monitor" in str(w.message)]


def test_explicit_attach_after_auto_attach_replaces_it_silently(armed: auto.AutoAttach,
                                                               recwarn: pytest.WarningsRecorder) -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loop(model, opt, 2)
    first = armed.monitor
    mine = healthd_client.attach(model, opt, job="mine", transport=RecordingTransport(), config=MonitorConfig(**FAST))
    assert first is not None and first.closed and mine is not first and not mine.closed
    loop(model, opt, 2)  # auto-attach no longer completes steps on the closed monitor
    mine.close()
    assert not [w for w in recwarn if "already has a monitor" in str(w.message)]


def test_a_second_optimizer_gets_its_own_stream(armed: auto.AutoAttach, transport: RecordingTransport) -> None:
    a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=1e-3), torch.optim.SGD(b.parameters(), lr=1e-3)
    for _ in range(3):
        loop(a, opt_a, 1)
        loop(b, opt_b, 1)
    # b first ran after a's first step: a keeps the unnamed stream; Linear names no role, so b is by its order
    assert list(armed.monitors) == [None, "optimizer_1"]
    assert armed.monitors[None]._optimizer is opt_a and armed.monitors["optimizer_1"]._model is b
    armed.close()
    steps = transport.of_kind("step")
    assert [s["step"] for s in steps if "stream" not in s] == [0, 1, 2]
    assert [s["step"] for s in steps if s.get("stream") == "optimizer_1"] == [0, 1, 2]


def test_a_failure_is_logged_once_and_training_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HEALTHD_SERVER", "http://unused")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    a = auto.AutoAttach(attach=broken)
    a.install()
    try:
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        with caplog.at_level(logging.WARNING, logger="healthd_client.auto"):
            loop(model, opt, 3)
    finally:
        a.remove()
    assert a.failed
    assert sum("auto-attach failed" in r.message for r in caplog.records) == 1


def test_bootstrap_does_nothing_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEALTHD_AUTO", raising=False)
    before = list(sys.meta_path)
    bootstrap.start()
    assert sys.meta_path == before and not bootstrap.enabled()
    monkeypatch.setenv("HEALTHD_AUTO", "0")
    assert not bootstrap.enabled()


def test_pth_line_does_not_import_torch_when_off() -> None:
    line = (REPO / "client" / "healthd_auto.pth").read_text()
    assert line.startswith("import os;") and "torch" not in line and line.count("\n") == 1


def test_default_job_is_the_same_on_every_rank() -> None:
    environ = {"TORCHELASTIC_RUN_ID": "abc"}
    assert auto.default_job(["/x/train.py", "--lr", "1"], environ) == "train-abc"
    assert auto.default_job(["/x/train.py"], {"TORCHELASTIC_RUN_ID": "none"}) == "train"


def test_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = launcher.parser().parse_args(["--server", "http://h:9184", "--", "torchrun", "train.py"])
    env = launcher.environment(args, ["torchrun", "train.py"], {"PYTHONPATH": "/a"})
    assert env["HEALTHD_AUTO"] == "1" and env["HEALTHD_SERVER"] == "http://h:9184"
    assert env["HEALTHD_JOB"].startswith("train-")
    assert env["PYTHONPATH"].split(":") == [str(launcher.AUTOSTART_DIR), "/a"]
    with pytest.raises(ValueError, match="HEALTHD_SERVER"):
        launcher.environment(launcher.parser().parse_args(["--", "python"]), ["python"], {})


def test_launcher_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        launcher.main(["--help"])
    out = capsys.readouterr().out
    assert all(word in out for word in ("--server", "--job", "--token", "HEALTHD_AUTO=1", "torchrun", "--stop-on",
                                        "HEALTHD_STOP_ON", "TrainingStopped"))


def test_launcher_stop_on_sets_the_switch_and_refuses_non_names() -> None:
    args = launcher.parser().parse_args(["--server", "h", "--stop-on", "NonFiniteValues, LossPlateau", "--", "x"])
    assert launcher.environment(args, ["x"], {})["HEALTHD_STOP_ON"] == "NonFiniteValues,LossPlateau"
    assert "HEALTHD_STOP_ON" not in launcher.environment(launcher.parser().parse_args(["--server", "h", "--", "x"]),
                                                         ["x"], {})
    with pytest.raises(ValueError, match="--stop-on"):
        launcher.environment(launcher.parser().parse_args(["--server", "h", "--stop-on", "nan!", "--", "x"]), ["x"], {})


def test_stop_on_from_env_drops_what_cannot_be_an_alert(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="healthd_client.auto"):
        names = auto.stop_on_from_env({"HEALTHD_STOP_ON": "NonFiniteValues,,9bad ExplodingGradients,NonFiniteValues"})
    assert names == ("NonFiniteValues", "ExplodingGradients")
    assert sum("'9bad'" in r.message for r in caplog.records) == 1
    assert auto.stop_on_from_env({}) == ()


def test_healthd_stop_on_stops_at_the_next_step_as_explicit_stop_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTHD_SERVER", "http://unused")
    monkeypatch.setenv("HEALTHD_JOB", "test-job")
    monkeypatch.setenv("HEALTHD_STOP_ON", "NonFiniteValues")
    answering = Answering()
    a = auto.AutoAttach(attach=functools.partial(healthd_client.attach, transport=answering),
                        config=MonitorConfig(**FAST))
    a.install()
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    try:
        loop(model, opt, 2)
        assert a.monitor is not None
        answering.firing = [NAN_ALERT]
        with pytest.raises(healthd_client.TrainingStopped, match="NonFiniteValues") as stopped:
            for _ in range(3000):  # each step pushes its report; the answer names the alert
                loop(model, opt, 1)
                time.sleep(0.01)
        assert stopped.value.alert.rule == "NonFiniteValues" and a.monitor.stopped_by is not None
        assert not a.failed  # the stop is the job's request, not a failure of auto-attach
    finally:
        a.remove()
        if a.monitor is not None:
            a.monitor.close()


def test_kubernetes_example_sets_what_auto_attach_reads() -> None:
    job = yaml.safe_load((REPO / "deploy" / "k8s" / "examples" / "training-job.yaml").read_text())
    env = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"HEALTHD_AUTO", "HEALTHD_SERVER", "HEALTHD_JOB", "HEALTHD_TOKEN"} <= env


def test_checkpoints_and_copies_carry_nothing_of_auto_attach(armed: auto.AutoAttach,
                                                             transport: RecordingTransport) -> None:
    import copy
    import io

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loop(model, opt, 4)
    assert armed.monitor is not None and armed.monitor._model is model
    buf = io.BytesIO()
    torch.save(model, buf)  # with a hook of ours on the model this fails: the hook pickles AutoAttach
    buf.seek(0)
    with torch.serialization.safe_globals([torch.nn.Sequential, torch.nn.Linear, torch.nn.ReLU]):
        loaded = torch.load(buf, weights_only=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in (*loaded.modules(), *model.modules()))
    twin = copy.deepcopy(model)
    before = armed._loss
    twin(torch.randn(2, 4)).sum()  # the copy's forward is not the watched model's
    assert armed._loss is before


def squared_error(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A loss no module computes: auto-attach sees it only as what backward() is called on."""
    return ((pred - y) ** 2).mean()


def test_a_plain_function_loss_is_what_backward_is_called_on(armed: auto.AutoAttach,
                                                              transport: RecordingTransport) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    for _ in range(4):
        x = torch.randn(8, 4)
        loss = squared_error(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    assert armed.monitor is not None
    armed.monitor.close()
    steps = transport.of_kind("step")
    assert [s["step"] for s in steps] == [0, 1, 2, 3]  # step 0 too: the window opens before attaching
    assert [s["loss"] for s in steps] == pytest.approx(seen)


def test_a_sum_of_losses_is_reported_as_the_sum(armed: auto.AutoAttach, transport: RecordingTransport) -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    criterion = torch.nn.MSELoss()  # one term is a loss module's output: the sum, not that term, is the loss
    seen = []
    for step in range(4):
        x = torch.randn(8, 4)
        out = model(x)
        loss_a = criterion(out[:, 0], x.sum(1))
        loss_b = torch.nn.functional.l1_loss(out[:, 1], x.mean(1))
        opt.zero_grad()
        if step % 2:
            torch.autograd.backward(loss_a + 0.5 * loss_b)
        else:
            (loss_a + 0.5 * loss_b).backward()
        opt.step()
        seen.append((loss_a + 0.5 * loss_b).item())
    assert armed.monitor is not None
    armed.monitor.close()
    assert [s["loss"] for s in transport.of_kind("step")] == pytest.approx(seen)


def test_the_backward_window_leaves_the_mode_stack_as_it_found_it(armed: auto.AutoAttach) -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    depth = torch._C._len_torch_function_stack()
    loop(model, opt, 3)
    with torch.no_grad():
        model(torch.randn(2, 4))  # evaluation opens no window
    assert torch._C._len_torch_function_stack() == depth
    x = torch.randn(2, 4)
    model(x).sum()  # a forward with grad on and no backward yet: the window is open until the next step
    assert torch._C._len_torch_function_stack() == depth + 1
    opt.step()
    assert torch._C._len_torch_function_stack() == depth


def test_a_compiled_model_compiles_once_and_its_loss_is_seen(armed: auto.AutoAttach,
                                                             transport: RecordingTransport) -> None:
    frames = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        frames.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    compiled = torch.compile(model, backend=counting_backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = []
    for _ in range(auto._DISCOVERY_STEPS + 8):  # past the end of discovery too
        x = torch.randn(8, 4)
        loss = squared_error(compiled(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    assert armed.monitor is not None and not armed._discovering
    armed.monitor.close()
    assert len(frames) == 1  # the model's frame starts with the same mode stack every step: no recompile
    assert [s["loss"] for s in transport.of_kind("step")] == pytest.approx(seen)
