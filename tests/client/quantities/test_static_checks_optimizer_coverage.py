"""StaticChecks' optimizer coverage: frozen tensors in the optimizer while trainable layers are missing from it."""

from __future__ import annotations

import pytest
import torch

from healthd_client.quantities.static_checks import optimizer_coverage


def test_an_optimizer_built_before_get_peft_model_names_the_adapters_it_lacks() -> None:
    peft = pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(base.parameters(), lr=1e-4)  # before the adapters exist
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    found = optimizer_coverage(model, opt)
    assert found[0]["check"] == "frozen_in_optimizer"
    assert "have requires_grad=False" in found[0]["detail"] and "2 layers" in found[0]["detail"]
    assert [(f["check"], f["layer"]) for f in found[1:]] == [
        ("trainable_not_in_optimizer", "h.0.attn.c_attn:lora"), ("trainable_not_in_optimizer", "h.1.attn.c_attn:lora")]
    assert optimizer_coverage(model, torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4)) == []  # built after: nothing


def test_either_half_alone_is_ordinary() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    half = torch.optim.SGD(model[1].parameters(), lr=0.1)  # a GAN's optimizer holds half the model
    assert optimizer_coverage(model, half) == []
    whole = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].requires_grad_(False)  # a frozen layer left in the optimizer: it is just not updated
    assert optimizer_coverage(model, whole) == []
    both = torch.optim.SGD(model[0].parameters(), lr=0.1)  # holds the frozen layer, lacks the trainable one
    assert [f.get("layer") for f in optimizer_coverage(model, both)] == [None, "1"]
