import math
import textwrap
import warnings

import pytest
import torch

import healthd_client
from healthd_client import MonitorConfig
from healthd_client.quantities.base import Quantity
from tests.client.conftest import FAST, Net, RecordingTransport, step_reports, train_steps, validate


def test_every_report_kind_validates_against_the_schema(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = make_monitor(model, optimizer, dataset_size=1000, num_classes=2, grad_accumulation_steps=2,
                           config_kwargs={"heavy_every_steps": 2})
    train_steps(model, optimizer, monitor, 3)
    optimizer.zero_grad()
    loss = model(torch.randn(2, 4)).sum() * float("nan")
    loss.backward()
    optimizer.step()
    monitor.step(loss=loss, batch_size=2)
    monitor.eval(loss=torch.tensor(0.25), accuracy=0.5, top5=torch.tensor(0.9), f1=0.1)
    monitor.close()
    kinds = set()
    for body in transport.bodies:
        for report in validate(body).reports:
            kinds.add(report.kind)
    assert kinds == {"attach", "step", "eval", "heartbeat"}
    assert math.isnan(step_reports(transport)[3]["loss"])


def test_attach_report(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    make_monitor(model, optimizer, job="resnet-run-7", rank=1, world_size=4, dataset_size=50_000,
                 num_classes=10).close()
    (attach,) = transport.of_kind("attach")
    assert attach["job"] == "resnet-run-7"
    assert (attach["rank"], attach["world_size"]) == (1, 4)
    assert attach["hints"] == {"dataset_size": 50_000, "num_classes": 10, "grad_accumulation_steps": 1,
                               "fine_tune": False}
    assert set(attach["versions"]) == {"torch", "python", "healthd_client"}
    assert attach["hostname"]


def test_step_fields(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    losses = train_steps(model, optimizer, monitor, 2)
    model.eval()
    train_steps(model, optimizer, monitor, 1)
    monitor.close()
    reports = step_reports(transport)
    assert sorted(reports) == [0, 1, 2]
    assert reports[0]["loss"] == pytest.approx(losses[0])
    assert reports[0]["batch_size"] == 5
    assert reports[0]["training"] is True and reports[2]["training"] is False
    assert reports[0]["lr"] == [0.1]
    assert reports[0]["rank"] == 0 and reports[0]["job"] == "test-job"


def test_record_without_monitor_step_is_closed_by_the_next_step(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()  # no monitor.step()
    monitor.close()
    reports = step_reports(transport)
    assert sorted(reports) == [0, 1]
    assert all("loss" not in r and "grad_norm" in r for r in reports.values())


def test_monitor_step_without_optimizer_step(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    monitor.step(loss=1.5, batch_size=3)  # e.g. AMP skipped optimizer.step()
    monitor.close()
    (report,) = transport.of_kind("step")
    assert report["loss"] == 1.5 and "grad_norm" not in report and "lr" not in report


def test_eval_is_at_the_last_completed_step(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    monitor.eval(loss=1.0)
    train_steps(model, optimizer, monitor, 3)
    monitor.eval(loss=0.5, accuracy=torch.tensor(0.75), bleu=12.5)
    monitor.close()
    first, second = transport.of_kind("eval")
    assert first["step"] == 0
    assert second == {**second, "step": 2, "loss": 0.5, "accuracy": 0.75, "metrics": {"bleu": 12.5}}


def test_eval_metric_names_are_made_label_safe(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    monitor.eval(**{"val acc": 0.5, "f1/macro": 0.25, "x" * 100: 1.0})
    monitor.close()
    (report,) = transport.of_kind("eval")
    # What healthd's schema accepts (EvalReport.metrics): a space would cost the whole report a 422.
    assert report["metrics"] == {"val_acc": 0.5, "f1/macro": 0.25, "x" * 64: 1.0}
    from healthd.wire.schema import EvalReport
    EvalReport.model_validate({**report, "job": "j", "time": 1.0})


def test_bad_batch_size_is_dropped_with_one_warning(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer)
    with pytest.warns(RuntimeWarning, match="batch_size") as caught:
        monitor.step(batch_size=-1)
        monitor.step(batch_size="ten")
    assert len(caught) == 1
    monitor.close()
    assert all("batch_size" not in r for r in transport.of_kind("step"))


class Exploding(Quantity):
    name = "exploding"

    def __init__(self, where: str) -> None:
        super().__init__(every_steps=1)
        self.where = where
        self.calls = 0

    def before_step(self, ctx):
        self.calls += 1
        if self.where == "before_step":
            raise RuntimeError("boom")
        ctx.record.put(self, "x", torch.tensor(1.0))

    def write(self, report, values):
        if self.where == "write":
            raise KeyError("boom")


@pytest.mark.parametrize("where", ["before_step", "write"])
def test_a_failing_quantity_is_disabled_with_one_warning(transport, where):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    exploding = Exploding(where)
    monitor = healthd_client.attach(model, optimizer, job="j", transport=transport,
                                    config=MonitorConfig(**FAST), extra_quantities=[exploding])
    with pytest.warns(RuntimeWarning, match="exploding") as caught:
        train_steps(model, optimizer, monitor, 4)
    monitor.close()
    assert len([w for w in caught if "exploding" in str(w.message)]) == 1
    assert exploding.calls == 1
    assert monitor.disabled_quantities == ["exploding"]
    (closing,) = [r for r in transport.of_kind("heartbeat") if r["closing"]]
    (disabled,) = closing["disabled_quantities"]  # healthd's MonitoringDegraded says so to on-call
    assert disabled["name"] == "exploding" and "boom" in disabled["reason"] and where in disabled["reason"]
    reports = step_reports(transport)
    assert sorted(reports) == [0, 1, 2, 3]  # training and the other measurements went on
    assert all("grad_norm" in r for r in reports.values())


def test_strict_re_raises(transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = healthd_client.attach(model, optimizer, job="j", transport=transport, strict=True,
                                    config=MonitorConfig(**FAST), extra_quantities=[Exploding("before_step")])
    with pytest.raises(RuntimeError, match="boom"):
        train_steps(model, optimizer, monitor, 1)
    monitor.close()


def test_a_failing_monitor_stops_measuring_but_training_goes_on(make_monitor, transport, monkeypatch):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, strict=False)

    def broken(record):
        raise RuntimeError("packing broke")

    monkeypatch.setattr("healthd_client.monitor.PackedRecord", broken)
    with pytest.warns(RuntimeWarning, match="stops measuring"):
        train_steps(model, optimizer, monitor, 3)
    monitor.close()
    assert transport.of_kind("step") == []
    assert transport.of_kind("heartbeat")[-1]["closing"] is True


def test_second_attach_returns_the_first_monitor(make_monitor):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = make_monitor(model, optimizer)
    with pytest.warns(RuntimeWarning, match="already has a monitor"):
        second = make_monitor(model, optimizer)
    assert second is first
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    first.close()
    third = make_monitor(model, optimizer)
    assert third is not first


def test_close_removes_hooks_and_is_idempotent(make_monitor, transport):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with make_monitor(model, optimizer) as monitor:
        train_steps(model, optimizer, monitor, 1)
    assert monitor.closed
    assert len(optimizer._optimizer_step_pre_hooks) == 0
    assert len(optimizer._optimizer_step_post_hooks) == 0
    monitor.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, optimizer, monitor, 1)  # no-ops after close
        monitor.eval(loss=1.0)
    assert len(transport.of_kind("step")) == 1
    assert [h["closing"] for h in transport.of_kind("heartbeat")] == [True]


def test_env_defaults_and_token(monkeypatch):
    monkeypatch.setenv("HEALTHD_JOB", "from-env")
    monkeypatch.setenv("HEALTHD_TOKEN", "s3cret")
    transport = RecordingTransport()
    model = Net()
    monitor = healthd_client.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), transport=transport,
                                    config=MonitorConfig(**FAST))
    monitor.close()
    assert transport.of_kind("attach")[0]["job"] == "from-env"
    assert transport.headers[0]["Authorization"] == "Bearer s3cret"


@pytest.mark.parametrize("kwargs, match", [
    ({"job": "bad job name"}, "job"),
    ({"job": None}, "job"),
    ({"job": "j", "transport": None}, "server"),
    ({"job": "j", "grad_accumulation_steps": 0}, "grad_accumulation_steps"),
    ({"job": "j", "num_classes": -1}, "num_classes"),
    ({"job": "j", "config": {"max_layers": 3}}, "config"),
])
def test_invalid_arguments(monkeypatch, kwargs, match):
    monkeypatch.delenv("HEALTHD_JOB", raising=False)
    monkeypatch.delenv("HEALTHD_SERVER", raising=False)
    model = Net()
    kwargs = {"transport": RecordingTransport(), **kwargs}
    with pytest.raises(ValueError, match=match):
        healthd_client.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


class GpuLike(Quantity):
    """A plugin that emits its own report kind, as the GPU sampler will."""

    name = "gpu_like"

    def __init__(self) -> None:
        super().__init__(every_steps=0)

    def on_attach(self, ctx):
        ctx.emit({"kind": "gpu", "gpu": 0, "uuid": "GPU-fake", "memory_used_bytes": 1})


def test_plugins_can_emit_other_report_kinds(make_monitor, transport):
    model = Net()
    make_monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), extra_quantities=[GpuLike()]).close()
    (gpu,) = transport.of_kind("gpu")
    assert gpu["job"] == "test-job" and gpu["rank"] == 0
    for body in transport.bodies:
        validate(body)


def test_pending_records_beyond_the_bound_are_dropped_and_counted(make_monitor, transport, monkeypatch):
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, config_kwargs={"max_pending_records": 2})
    monkeypatch.setattr("healthd_client.packing.PackedRecord.ready", lambda self: False)  # a GPU far behind
    train_steps(model, optimizer, monitor, 5)
    assert monitor.sender.dropped_total == 3
    monkeypatch.undo()
    monitor.close()
    assert sorted(step_reports(transport)) == [3, 4]
    assert transport.of_kind("heartbeat")[-1]["reports_dropped_total"] == 3


def test_the_plugin_example_in_base_works(make_monitor, transport):
    from healthd_client.quantities import base

    source = base.__doc__.split("class ParamFingerprint")[1].split("    attach(")[0]
    namespace = {"Quantity": Quantity, "torch": torch}
    exec("class ParamFingerprint" + textwrap.dedent("    " + source.strip("\n")), namespace)  # noqa: S102
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = make_monitor(model, optimizer, extra_quantities=[namespace["ParamFingerprint"](every_steps=2)])
    train_steps(model, optimizer, monitor, 3)
    monitor.close()
    reports = step_reports(transport)
    assert [s for s, r in sorted(reports.items()) if "param_fingerprint" in r] == [0, 2]
    for body in transport.bodies:
        validate(body)
