"""Layer names under peft: named after the module an adapter adapts, one layer per adapted module."""

from __future__ import annotations

import pytest
import torch

from healthd_client.layers import build_layer_plan, readable_layer_name

PREFIXES = ("base_model.model.transformer.", "base_model.model.")


@pytest.mark.parametrize(("path", "name"), [
    ("base_model.model.transformer.h.0.attn.c_attn.lora_A.default", "h.0.attn.c_attn:lora"),
    ("base_model.model.transformer.h.0.attn.c_attn.lora_B.default", "h.0.attn.c_attn:lora"),
    ("base_model.model.transformer.h.0.attn.c_attn.lora_A.math", "h.0.attn.c_attn:lora.math"),
    ("base_model.model.transformer.h.0.attn.c_attn.base_layer", "h.0.attn.c_attn"),
    ("base_model.model.transformer.wte.lora_embedding_A", "wte:lora"),  # a ParameterDict: the adapter is a key
    ("base_model.model.transformer.h.1.mlp.c_fc.lora_magnitude_vector.default", "h.1.mlp.c_fc:lora"),  # DoRA
    ("base_model.model.transformer.h.0.mlp.c_proj", "h.0.mlp.c_proj"),
    ("base_model.model.transformer.ln_f", "ln_f"),
    ("base_model.model.lm_head", "lm_head"),  # outside the body: only peft's prefix is dropped
    ("base_model.model.score.modules_to_save.default", "score"),
    ("base_model.model.score.original_module", "score:original"),
    ("base_model.model", "root"),
])
def test_readable_layer_name(path: str, name: str) -> None:
    assert readable_layer_name(path, PREFIXES) == name


def test_only_the_prefixes_given_are_dropped() -> None:
    peft_only = ("base_model.model.",)
    assert readable_layer_name("base_model.model.bert.encoder.layer.0", peft_only) == "bert.encoder.layer.0"
    assert readable_layer_name("other.h.0", PREFIXES) == "other.h.0"


def _gpt2_lora() -> torch.nn.Module:
    peft = pytest.importorskip("peft")  # the test extra installs it
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))
    return peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))


def test_a_peft_models_layers_are_its_adapted_modules_with_a_and_b_together() -> None:
    model = _gpt2_lora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    plan = build_layer_plan(model, opt, max_layers=64)
    assert plan.names == ["h.0.attn.c_attn:lora", "h.1.attn.c_attn:lora"]
    assert [layer.module_type for layer in plan.layers] == ["LoRA", "LoRA"]
    assert [len(layer.param_indices) for layer in plan.layers] == [2, 2]  # lora_A and lora_B


def test_a_full_optimizer_over_a_peft_model_names_the_frozen_originals_by_their_module() -> None:
    model = _gpt2_lora()
    plan = build_layer_plan(model, torch.optim.SGD(model.parameters(), lr=0.1), max_layers=64)
    assert "h.0.attn.c_attn" in plan.names and "h.0.attn.c_attn:lora" in plan.names and "wte" in plan.names
    assert "ln_f" in plan.names  # lm_head is tied to wte: its tensor belongs to wte, its first owner
    assert not any("base_model" in n or "lora_A" in n or "base_layer" in n for n in plan.names)


def test_other_models_keep_their_module_paths() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    plan = build_layer_plan(model, torch.optim.SGD(model.parameters(), lr=0.1), max_layers=64)
    assert "transformer.h.0.attn.c_attn" in plan.names
