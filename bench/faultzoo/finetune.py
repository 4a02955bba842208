"""The fault zoo's fine-tuning cases: healthy fine-tunes of a small pretrained LM, and what goes wrong in them.

There is no download: the "pretrained" model is a tiny GPT-2 (``transformers``) trained
for a few hundred steps on a synthetic language (a Markov chain over 128 tokens, each
followed by one of three successors with probabilities 0.6/0.3/0.1), saved with
``save_pretrained`` and reloaded with ``from_pretrained``, as a user loads a hub model.
It is trained once per run seed and cached on disk (``pretrained``). The fine-tune data
is a dialect of that language: a fifth of the tokens have other successors, so a
fine-tune starts well below chance (ln 128 = 4.85) and improves slowly.

Controls (nothing above info, x3 seeds): LoRA (``peft``) in a plain loop with AdamW,
warmup and clipping; LoRA under the Hugging Face ``Trainer`` at its default
``TrainingArguments``; a full fine-tune at a small learning rate; a frozen pretrained
body with a new classification head; LoRA with gradient checkpointing; and two that
healthd cannot see are fine-tunes (no peft, no name, no hint: the weights come from a plain
``load_state_dict`` of a ``torch.save``d state dict): a full fine-tune at a small learning
rate, and a frozen body with a new head.
Faults, each raised by its own rule: the weights did not load (a model built from the
pretrained config only; a ``strict=False`` load of a checkpoint whose keys do not
match), an optimizer built before ``get_peft_model``, a learning rate far too high for
a fine-tune (its harm is measured: ``FINAL_LOSS``), and a NaN.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.faultzoo.scenarios import SEED, Scenario, Setup, seed

VOCAB = 128
SEQ = 32
BATCH = 16
_GPT2 = {"vocab_size": VOCAB, "n_positions": SEQ, "n_embd": 64, "n_layer": 2, "n_head": 4,
         "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
_PRETRAIN_STEPS = 200
_CACHE = Path(tempfile.gettempdir()) / "healthd-faultzoo"
# Mean loss of the last 10 steps of each run, by scenario name and seed: the LR fault's harm is checked on it.
FINAL_LOSS: dict[tuple[str, int], float] = {}


@cache
def _successors(dialect: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The language's transition table (``dialect`` 0 is the pretraining language; the data, not the seed)."""
    g = torch.Generator().manual_seed(7)
    nxt = torch.stack([torch.randperm(VOCAB, generator=g)[:3] for _ in range(VOCAB)])  # (V, 3)
    if dialect:
        g2 = torch.Generator().manual_seed(100 + dialect)
        changed = torch.rand(VOCAB, generator=g2) < 0.2
        nxt[changed] = torch.randint(0, VOCAB, (int(changed.sum()), 3), generator=g2)
    return nxt, torch.tensor([0.6, 0.3, 0.1])


def sample(n: int, g: torch.Generator, dialect: int = 1) -> torch.Tensor:
    """``n`` sequences of ``SEQ`` tokens of a dialect."""
    nxt, p = _successors(dialect)
    out = torch.empty(n, SEQ, dtype=torch.long)
    out[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, SEQ):
        pick = torch.multinomial(p.expand(n, 3), 1, generator=g).squeeze(1)
        out[:, t] = nxt[out[:, t - 1], pick]
    return out


def pretrained() -> Path:
    """A tiny GPT-2 trained on dialect 0, saved with ``save_pretrained`` (once per seed, cached on disk)."""
    key = hashlib.sha256(repr((_GPT2, _PRETRAIN_STEPS, 16, SEED.get())).encode()).hexdigest()[:12]
    path = _CACHE / f"gpt2-{key}"
    if (path / "config.json").exists():
        return path
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed(10))
    model = GPT2LMHeadModel(GPT2Config(**_GPT2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed(11))
    for _ in range(_PRETRAIN_STEPS):
        ids = sample(16, g, dialect=0)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.replace(path)  # whole or absent: a parallel run never reads half a checkpoint
    return path


def _load() -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(pretrained())


def _lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed(12))
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["c_attn", "c_proj", "c_fc"]))


def lm_loop(name: str, model: nn.Module, opt: torch.optim.Optimizer, mon: Any, *, steps: int = 150,
            warmup: int = 10, clip: float | None = 1.0,
            on_step: Callable[[int, nn.Module], None] | None = None) -> None:
    """A plain fine-tuning loop on dialect 1: linear warmup, clipping, the model's own causal-LM loss."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    g = torch.Generator().manual_seed(seed(13))
    losses: list[float] = []
    model.train()
    for i in range(steps):
        if on_step is not None:
            on_step(i, model)
        ids = sample(BATCH, g)
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
        opt.step()
        sched.step()
        mon.step(loss=loss.detach(), batch_size=BATCH)
        losses.append(float(loss.detach()))
    FINAL_LOSS[(name, SEED.get())] = sum(losses[-10:]) / 10


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------- controls


def ctrl_lora_loop(name: str = "ft_ctrl_lora_loop", checkpointing: bool = False) -> Setup:
    base = _load()
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _lora(base)
    opt = torch.optim.AdamW(_trainable(model), lr=1e-3)
    return Setup(model, opt, lambda mon: lm_loop(name, model, opt, mon), 150)


def ctrl_lora_trainer() -> Setup:
    """LoRA under ``transformers.Trainer`` at its default arguments (lr 5e-5, no warmup, batch 8)."""
    from transformers import Trainer, TrainingArguments

    from healthd_client.integrations.transformers import HealthdCallback

    model = _lora(_load())
    g = torch.Generator().manual_seed(seed(13))
    data = [{"input_ids": ids, "labels": ids} for ids in sample(800, g)]

    def train(attach_kwargs: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as out:
            torch.manual_seed(seed(14))
            trainer = Trainer(model=model, args=TrainingArguments(output_dir=out, max_steps=100), train_dataset=data,
                              callbacks=[HealthdCallback(**attach_kwargs)])
            trainer.train()
    return Setup(model, None, train, 100)


def ctrl_full_small_lr() -> Setup:
    model = _load()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Setup(model, opt, lambda mon: lm_loop("ft_ctrl_full_small_lr", model, opt, mon), 150)


class _Classifier(nn.Module):
    """A pretrained GPT-2 body (frozen) and a new linear head over its mean-pooled last hidden state."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        from transformers import GPT2Model

        self.body = GPT2Model.from_pretrained(pretrained())
        self.body.requires_grad_(False)
        self.head = nn.Linear(self.body.config.n_embd, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = self.body(input_ids=ids).last_hidden_state.mean(1)
        return self.head(h)


def ctrl_frozen_backbone_head() -> Setup:
    """New classes (which of 4 dialects wrote the sequence) on a frozen pretrained body: a fresh head starts at
    chance ln 4, as it should."""
    torch.manual_seed(seed(12))
    return _frozen_backbone_setup(_Classifier(4))


def _frozen_backbone_setup(model: _Classifier) -> Setup:
    opt = torch.optim.Adam(model.head.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed(13))

    def train(mon: Any) -> None:
        model.train()
        for _ in range(150):
            y = torch.randint(0, 4, (BATCH,), generator=g)
            ids = torch.stack([sample(1, g, dialect=int(k) + 1)[0] for k in y])
            opt.zero_grad()
            loss = F.cross_entropy(model(ids), y)
            loss.backward()
            opt.step()
            mon.step(loss=loss.detach(), batch_size=BATCH)
    return Setup(model, opt, train, 150)


def _checkpoint() -> Path:
    """The pretrained weights as a plain ``torch.save(model.state_dict())`` file, as a user's own training wrote
    them (no config, no name: healthd cannot tell from the model that it is pretrained)."""
    path = pretrained() / "state_dict.pt"
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        torch.save(_load().state_dict(), tmp)
        tmp.replace(path)
    return path


def ctrl_full_load_state_dict() -> Setup:
    """A full fine-tune at a small learning rate (2e-5, the usual range for a full fine-tune) of a model built
    from a config, whose weights come from ``model.load_state_dict(torch.load(ckpt))``: no hint, no peft, no
    name; only the first loss, far below chance, says that it starts from trained weights. Its loss moves
    slowly (without that inference LossPlateau warned "still near its initial" on 2 of 2 seeds)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed(10))
    model = GPT2LMHeadModel(GPT2Config(**_GPT2))
    model.load_state_dict(torch.load(_checkpoint()))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    return Setup(model, opt, lambda mon: lm_loop("ft_ctrl_full_load_state_dict", model, opt, mon), 150)


class _PlainClassifier(_Classifier):
    """``_Classifier`` whose body is built from a config and loaded with ``load_state_dict`` (no name)."""

    def __init__(self, classes: int) -> None:
        nn.Module.__init__(self)
        from transformers import GPT2Config, GPT2Model

        self.body = GPT2Model(GPT2Config(**_GPT2))
        body = {k.removeprefix("transformer."): v for k, v in torch.load(_checkpoint()).items()
                if k.startswith("transformer.")}
        self.body.load_state_dict(body)
        self.body.requires_grad_(False)
        self.head = nn.Linear(self.body.config.n_embd, classes)


def ctrl_frozen_backbone_load_state_dict() -> Setup:
    """``ctrl_frozen_backbone_head`` with a body loaded by ``load_state_dict`` and no hint: a fresh head
    starts at chance ln 4, a run from scratch as far as healthd can tell, and it is one for the head."""
    torch.manual_seed(seed(12))
    model = _PlainClassifier(4)
    return _frozen_backbone_setup(model)


# ---------------------------------------------------------------------------- faults


def weights_from_config_only() -> Setup:
    """``GPT2LMHeadModel(AutoConfig.from_pretrained(path))``: the config's name_or_path says pretrained, the
    weights are random: the first loss is at chance."""
    from transformers import AutoConfig, GPT2LMHeadModel

    torch.manual_seed(seed(10))
    model = _lora(GPT2LMHeadModel(AutoConfig.from_pretrained(pretrained())))
    opt = torch.optim.AdamW(_trainable(model), lr=1e-3)
    return Setup(model, opt, lambda mon: lm_loop("ft_weights_from_config_only", model, opt, mon, steps=30), 30)


def wrong_checkpoint_strict_false() -> Setup:
    """``load_state_dict(..., strict=False)`` of a checkpoint saved from a wrapper (every key prefixed
    ``module.``): nothing loads, and nothing says so. The user tells healthd it is a fine-tune."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed(10))
    model = GPT2LMHeadModel(GPT2Config(**_GPT2))  # no name_or_path: attach(fine_tune=True) says it
    state = {f"module.{k}": v for k, v in _load().state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys and result.missing_keys  # the fault: every key missed
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Setup(model, opt, lambda mon: lm_loop("ft_wrong_checkpoint_strict_false", model, opt, mon, steps=30),
                 30, {"fine_tune": True})


def optimizer_before_peft() -> Setup:
    base = _load()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-3)  # before get_peft_model: the base, no adapters
    model = _lora(base)
    return Setup(model, opt, lambda mon: lm_loop("ft_optimizer_before_peft", model, opt, mon, steps=30), 30)


def lr_far_too_high() -> Setup:
    """The full fine-tune at lr 0.3 instead of 1e-4 (no clipping): it wrecks the pretrained weights
    (FINAL_LOSS against the healthy fine-tune's)."""
    model = _load()
    opt = torch.optim.AdamW(model.parameters(), lr=0.3)
    return Setup(model, opt, lambda mon: lm_loop("ft_lr_far_too_high", model, opt, mon, clip=None), 150)


def nan_in_adapter() -> Setup:
    """A LoRA weight turns NaN at step 40 (a bad update, a corrupt resume): the loss of that step is NaN."""
    base = _load()
    model = _lora(base)
    opt = torch.optim.AdamW(_trainable(model), lr=1e-3)

    def poison(i: int, m: nn.Module) -> None:
        if i == 40:
            with torch.no_grad():
                next(p for n, p in m.named_parameters() if "lora_A" in n).view(-1)[0] = math.nan
    return Setup(model, opt, lambda mon: lm_loop("ft_nan_in_adapter", model, opt, mon, steps=50, on_step=poison), 50)


FINE_TUNE_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("ft_weights_from_config_only", "InitialLossUnexpected", weights_from_config_only),
    Scenario("ft_wrong_checkpoint_strict_false", "InitialLossUnexpected", wrong_checkpoint_strict_false),
    Scenario("ft_optimizer_before_peft", "WeightsNotUpdating", optimizer_before_peft),
    Scenario("ft_lr_far_too_high", "LearningRateTooHigh", lr_far_too_high),
    Scenario("ft_nan_in_adapter", "NonFiniteValues", nan_in_adapter, onset=40),
    Scenario("ft_ctrl_lora_loop", None, ctrl_lora_loop),
    Scenario("ft_ctrl_lora_trainer_defaults", None, ctrl_lora_trainer),
    Scenario("ft_ctrl_full_small_lr", None, ctrl_full_small_lr),
    Scenario("ft_ctrl_frozen_backbone_head", None, ctrl_frozen_backbone_head),
    Scenario("ft_ctrl_lora_grad_checkpointing", None,
             lambda: ctrl_lora_loop("ft_ctrl_lora_grad_checkpointing", checkpointing=True)),
    Scenario("ft_ctrl_full_load_state_dict", None, ctrl_full_load_state_dict),
    Scenario("ft_ctrl_frozen_backbone_load_state_dict", None, ctrl_frozen_backbone_load_state_dict),
)
