"""The fault zoo's cases with several models and optimizers in one job, one named stream each, and the
frameworks' loops at their defaults (issue: "Several models and optimizers in one job").

Each case attaches its own monitors (``Setup.optimizer`` is None: ``train`` gets attach()'s keyword
arguments) with ``stream=``; the runner records the stream of every alert, and a fault counts as
detected only when its alert fires on the stream of the broken model (``Scenario.stream``).

Controls (nothing above info, x3 seeds): an alternating GAN on digits (generator and discriminator
streams, adversarial losses); a WGAN with five critic steps per generator step; an actor-critic on a
digits bandit with a shared trunk (one backward of both losses, two optimizers); distillation into a
student from a teacher trained first on its own stream, then frozen; a causal LM from a GPT-2 config
under ``transformers.Trainer`` at its default ``TrainingArguments`` (only output_dir, max_steps, the
model and the data given); the GAN as a Lightning module in manual optimization (two optimizers,
``HealthdCallback(streams=...)``).
Faults: the generator's ``zero_grad()`` missing (MissingZeroGrad on the generator); the
discriminator's learning rate x100 (LearningRateTooHigh on the discriminator; ``QUALITY`` measures
the generator's samples against the data, and after 150 steps it shows no harm yet: 5.01 against the
healthy GAN's 5.39 on seed 0, both far from the data); a NaN weight under the Trainer (NonFiniteValues
at its step); a generator layer frozen after the optimizer was built, in Lightning.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.faultzoo.scenarios import SEED, Scenario, Setup, critic_step, digits, mlp, seed

# How far the generator's samples are from the data at the end of a GAN run, by scenario and seed: the
# distance between the real and fake feature means plus that between their per-feature stds (lower is better).
QUALITY: dict[tuple[str, int], float] = {}
GAN_STEPS = 150


def _attach(kwargs: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, stream: str, **kw: Any) -> Any:
    from healthd_client import attach

    return attach(model, opt, **{**kwargs, **kw}, stream=stream)


def _gen() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh())


def _quality(name: str, gen: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        fake = gen(torch.randn(512, 16, generator=torch.Generator().manual_seed(seed(9))))
    QUALITY[(name, SEED.get())] = float((fake.mean(0) - x.mean(0)).norm() + (fake.std(0) - x.std(0)).norm())


def _gan(name: str, critic_steps: int = 1, *, zero_grad_g: bool = True, lr_d_times: float = 1.0) -> Setup:
    """The tutorial GAN on digits (pixels in [-1, 1]): the discriminator steps, then the generator's loss
    flows back through it. ``critic_steps`` > 1: a WGAN (RMSprop, weight clipping, critic loss)."""
    torch.manual_seed(seed(0))
    gen, disc = _gen(), mlp(out=1)
    wgan = critic_steps > 1
    if wgan:
        opt_g: torch.optim.Optimizer = torch.optim.RMSprop(gen.parameters(), lr=5e-5)
        opt_d: torch.optim.Optimizer = torch.optim.RMSprop(disc.parameters(), lr=5e-5 * lr_d_times)
    else:
        opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4 * lr_d_times, betas=(0.5, 0.999))
    x = digits()[0].clamp(-1, 1)

    def train(kwargs: dict[str, Any]) -> None:
        g = torch.Generator().manual_seed(seed(1))
        mon_d = _attach(kwargs, disc, opt_d, "discriminator", loss_kind="adversarial")
        mon_g = _attach(kwargs, gen, opt_g, "generator", loss_kind="adversarial")
        for _ in range(GAN_STEPS // critic_steps):
            for _ in range(critic_steps):
                mon_d.step(loss=critic_step(gen, disc, opt_d, x, g, wgan), batch_size=64)
            if zero_grad_g:
                opt_g.zero_grad()
            fake = gen(torch.randn(64, 16, generator=g))
            loss_g = (-disc(fake).mean() if wgan
                      else F.binary_cross_entropy_with_logits(disc(fake), torch.ones(64, 1)))
            loss_g.backward()  # leaves gradients on the discriminator until its next zero_grad
            opt_g.step()
            mon_g.step(loss=loss_g.detach(), batch_size=64)
        mon_g.close()
        mon_d.close()
        _quality(name, gen, x)
    return Setup(gen, None, train, GAN_STEPS)


def ctrl_actor_critic_shared_trunk() -> Setup:
    """A contextual bandit on digits: the action is a class, the reward 1 when it is the label. A shared trunk,
    a policy head and a value head; the actor's optimizer holds the trunk and the policy head, the critic's the
    value head; one backward of both losses, then both steps (the trunk's gradients carry both)."""
    torch.manual_seed(seed(0))
    trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    policy, value = nn.Linear(64, 10), nn.Linear(64, 1)
    actor, critic = nn.Sequential(trunk, policy), nn.Sequential(trunk, value)
    opt_a = torch.optim.Adam([*trunk.parameters(), *policy.parameters()], lr=1e-3)
    opt_c = torch.optim.Adam(value.parameters(), lr=1e-3)
    x, y, _, _ = digits()
    steps = 150

    def train(kwargs: dict[str, Any]) -> None:
        g = torch.Generator().manual_seed(seed(1))
        # Neither loss should simply go down: the policy-gradient surrogate is no loss at all, and the value
        # loss chases targets that move with the policy (the reward's variance p(1-p) grows as accuracy
        # climbs from 10% toward 50%). "adversarial" is the loss kind that is not judged by going down.
        mon_a = _attach(kwargs, actor, opt_a, "actor", loss_kind="adversarial")
        mon_c = _attach(kwargs, critic, opt_c, "critic", loss_kind="adversarial")
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            h = trunk(x[idx])
            dist = torch.distributions.Categorical(logits=policy(h))
            action = dist.sample()
            reward = (action == y[idx]).float()
            v = value(h).squeeze(1)
            loss_a = -((reward - v.detach()) * dist.log_prob(action)).mean()
            loss_c = F.mse_loss(v, reward)
            opt_a.zero_grad()
            opt_c.zero_grad()
            (loss_a + loss_c).backward()
            opt_a.step()
            opt_c.step()
            mon_a.step(loss=loss_a.detach(), batch_size=64)
            mon_c.step(loss=loss_c.detach(), batch_size=64)
        mon_a.close()
        mon_c.close()
    return Setup(actor, None, train, steps)


def ctrl_distillation_teacher_stream() -> Setup:
    """The teacher trains on its own stream, is frozen, and a student learns its softened outputs on another."""
    torch.manual_seed(seed(0))
    teacher, student = mlp(width=128), mlp(width=32)
    opt_t = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    opt_s = torch.optim.Adam(student.parameters(), lr=1e-3)
    x, y, _, _ = digits()
    steps = 150

    def train(kwargs: dict[str, Any]) -> None:
        g = torch.Generator().manual_seed(seed(1))
        mon_t = _attach(kwargs, teacher, opt_t, "teacher", num_classes=10)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt_t.zero_grad()
            loss = F.cross_entropy(teacher(x[idx]), y[idx])
            loss.backward()
            opt_t.step()
            mon_t.step(loss=loss.detach(), batch_size=64)
        mon_t.close()
        teacher.requires_grad_(False).eval()
        mon_s = _attach(kwargs, student, opt_s, "student")
        for _ in range(steps):
            xb = x[torch.randint(0, len(x), (64,), generator=g)]
            with torch.no_grad():
                soft = F.softmax(teacher(xb) / 2.0, -1)
            opt_s.zero_grad()
            loss = F.kl_div(F.log_softmax(student(xb) / 2.0, -1), soft, reduction="batchmean")
            loss.backward()
            opt_s.step()
            mon_s.step(loss=loss.detach(), batch_size=64)
        mon_s.close()
    return Setup(student, None, train, 2 * steps)


def _clm_trainer(name: str, nan_at: int | None = None) -> Setup:
    """A causal LM from a GPT-2 config (``run_clm.py``'s shape) under ``transformers.Trainer`` with default
    ``TrainingArguments`` but output_dir and max_steps; ``nan_at``: a weight turns NaN before that step."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from bench.faultzoo.finetune import _GPT2, sample
    from healthd_client.integrations.transformers import HealthdCallback

    torch.manual_seed(seed(10))
    model = GPT2LMHeadModel(GPT2Config(**_GPT2))
    g = torch.Generator().manual_seed(seed(13))
    data = [{"input_ids": ids, "labels": ids} for ids in sample(800, g, dialect=0)]
    steps = 100

    class Poison(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == nan_at:
                weight = next(p for n, p in model.named_parameters() if n.endswith("h.0.mlp.c_fc.weight"))
                with torch.no_grad():
                    weight.view(-1)[0] = math.nan

    def train(attach_kwargs: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as out:
            torch.manual_seed(seed(14))
            callbacks: list[Any] = [HealthdCallback(**attach_kwargs)]
            if nan_at is not None:
                callbacks.append(Poison())
            Trainer(model=model, args=TrainingArguments(output_dir=out, max_steps=steps), train_dataset=data,
                    callbacks=callbacks).train()
    return Setup(model, None, train, steps)


def _lightning_gan(name: str, freeze_layer: bool = False) -> Setup:
    """The alternating GAN as a LightningModule in manual optimization, reported by ``HealthdCallback`` with
    a stream per optimizer. ``freeze_layer``: the generator's first layer is frozen after its optimizer was
    built (a fine-tuning habit in the wrong place): it never trains."""
    import lightning.pytorch as pl

    from healthd_client.integrations.lightning import HealthdCallback

    x = digits()[0].clamp(-1, 1)

    class GAN(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.gen, self.disc = _gen(), mlp(out=1)

        def on_train_start(self) -> None:
            if freeze_layer:
                self.gen[0].requires_grad_(False)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
            optimizers = self.optimizers()
            assert isinstance(optimizers, list)
            opt_g, opt_d = optimizers
            (real,) = batch
            n = len(real)
            fake = self.gen(torch.randn(n, 16))
            loss_d = (F.binary_cross_entropy_with_logits(self.disc(real), torch.ones(n, 1))
                      + F.binary_cross_entropy_with_logits(self.disc(fake.detach()), torch.zeros(n, 1)))
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            loss_g = F.binary_cross_entropy_with_logits(self.disc(self.gen(torch.randn(n, 16))), torch.ones(n, 1))
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [torch.optim.Adam(self.gen.parameters(), lr=2e-4, betas=(0.5, 0.999)),
                    torch.optim.Adam(self.disc.parameters(), lr=2e-4, betas=(0.5, 0.999))]

    torch.manual_seed(seed(0))
    module = GAN()
    steps = 150

    def train(attach_kwargs: dict[str, Any]) -> None:
        torch.manual_seed(seed(1))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64, shuffle=True,
                                             drop_last=True, generator=torch.Generator().manual_seed(seed(2)))
        callback = HealthdCallback(streams=("generator", "discriminator"), loss_kind="adversarial", **attach_kwargs)
        trainer = pl.Trainer(max_steps=2 * steps, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=[callback])
        trainer.fit(module, loader)  # max_steps counts both optimizers' steps in manual optimization
        _quality(name, module.gen, x)
    return Setup(module, None, train, steps)


MULTI_SCENARIOS: tuple[Scenario, ...] = (
    Scenario("multi_gan_missing_zero_grad_g", "MissingZeroGrad",
             lambda: _gan("multi_gan_missing_zero_grad_g", zero_grad_g=False), stream="generator"),
    Scenario("multi_gan_lr_x100_disc", "LearningRateTooHigh",
             lambda: _gan("multi_gan_lr_x100_disc", lr_d_times=100.0), stream="discriminator"),
    Scenario("multi_hf_trainer_nan", "NonFiniteValues", lambda: _clm_trainer("multi_hf_trainer_nan", nan_at=40),
             onset=40),
    Scenario("multi_lightning_frozen_layer", "GradientsNotFlowing",
             lambda: _lightning_gan("multi_lightning_frozen_layer", freeze_layer=True), stream="generator"),
    Scenario("multi_ctrl_gan_alternating", None, lambda: _gan("multi_ctrl_gan_alternating")),
    Scenario("multi_ctrl_wgan_critic_x5", None, lambda: _gan("multi_ctrl_wgan_critic_x5", critic_steps=5)),
    Scenario("multi_ctrl_actor_critic", None, ctrl_actor_critic_shared_trunk),
    Scenario("multi_ctrl_distillation", None, ctrl_distillation_teacher_stream),
    Scenario("multi_ctrl_hf_trainer_clm", None, lambda: _clm_trainer("multi_ctrl_hf_trainer_clm")),
    Scenario("multi_ctrl_lightning_gan", None, lambda: _lightning_gan("multi_ctrl_lightning_gan")),
)
