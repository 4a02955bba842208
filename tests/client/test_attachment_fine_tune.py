"""The fine_tune hint: given to attach(), or inferred from a peft wrapper or a Hugging Face model loaded by name."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from healthd.wire.schema import AttachReport
from healthd_client.attachment import looks_pretrained
from tests.client.conftest import Net


class HubModel(Net):
    """What from_pretrained leaves: ``config.name_or_path``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(name_or_path=name)


class LoraWrapper(torch.nn.Module):
    """A peft PeftModel's shape: ``peft_config`` on the wrapper."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.base_model = inner
        self.peft_config = {"default": object()}

    def forward(self, x: torch.Tensor) -> Any:
        return self.base_model(x)


@pytest.mark.parametrize(("model", "expected"), [
    (Net(), False),
    (HubModel(""), False),  # built from a config
    (HubModel("gpt2"), True),
    (LoraWrapper(Net()), True),
    (torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel), False),
])
def test_inferred(model: torch.nn.Module, expected: bool) -> None:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        torch.nn.Module.__init__(model)
        model.module = HubModel("bert-base-uncased")
        expected = True  # the wrapped model is looked through
    assert looks_pretrained(model) is expected


@pytest.mark.parametrize(("given", "model", "expected"), [
    (None, Net(), False), (None, HubModel("gpt2"), True), (True, Net(), True), (False, HubModel("gpt2"), False),
])
def test_sent_in_the_attach_report(make_monitor, transport, given: bool | None, model: torch.nn.Module,
                                   expected: bool) -> None:
    monitor = make_monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), fine_tune=given)
    monitor.close()
    (report,) = transport.of_kind("attach")
    assert AttachReport.model_validate(report).hints.fine_tune is expected


def test_rejects_a_non_bool(make_monitor) -> None:
    model = Net()
    with pytest.raises(ValueError, match="fine_tune"):
        make_monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), fine_tune="yes")
