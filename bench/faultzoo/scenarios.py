"""The fault zoo's scenarios: one known mistake each, and healthy controls.

A scenario is a name, the alert it must raise (``None`` for a control, which
must raise nothing above ``info``), the step the fault starts (its onset) and a
``setup`` that returns the model, optimizer, attach hints and a training
function. Data: scikit-learn's bundled ``load_digits`` (1797 8x8 images, 10
classes; no download) and small synthetic tasks. Everything runs on CPU.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The run's seed (``python -m bench.faultzoo --seeds N`` runs each scenario with seeds 0..N-1): scenarios
# take their torch seeds from ``seed(k)``, so a run's weights and minibatches change with it, not the data.
SEED: contextvars.ContextVar[int] = contextvars.ContextVar("faultzoo_seed", default=0)


def seed(k: int) -> int:
    """The k-th random seed of a scenario under the current run's seed."""
    return k + 1000 * SEED.get()


@dataclass
class Setup:
    model: nn.Module
    # None: the scenario attaches itself (a framework's callback makes the optimizer); ``train`` then gets
    # attach()'s keyword arguments (job, transport, config, strict, hints) instead of a monitor.
    optimizer: torch.optim.Optimizer | None
    train: Callable[[Any], int | None]  # returns an onset override, or None
    steps: int
    hints: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    expected: str | None
    setup: Callable[[], Setup]
    onset: int = 0
    fast: bool = False  # part of the test suite's subset
    stream: str | None = None  # the stream the expected alert must fire on (None: the unnamed stream)


@cache
def digits(raw: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed(0))
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    if not raw:
        mean, std = x[:1400].mean(0), x[:1400].std(0).clamp_min(1.0)
        x = (x - mean) / std
    return x[:1400], y[:1400], x[1400:], y[1400:]


def mlp(act: type[nn.Module] = nn.ReLU, width: int = 64, depth: int = 2, inp: int = 64, out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = inp
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, out))
    return nn.Sequential(*layers)


def loop(model: nn.Module, opt: torch.optim.Optimizer, mon: Any, *, steps: int = 120, batch: int | Callable[[int], int]
         = 64, raw: bool = False, loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
         forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
         inject: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
         zero_grad: bool = True, eval_every: int = 0, sign: float = 1.0, labels: torch.Tensor | None = None,
         train_size: int = 1400, on_step: Callable[[int], None] | None = None, clip: float | None = None,
         sched: Any = None) -> None:
    """Minibatch training on digits with hooks to inject a fault."""
    x, y, xv, yv = digits(raw)
    x, y = x[:train_size], (labels if labels is not None else y)[:train_size]
    g = torch.Generator().manual_seed(seed(1))
    for i in range(steps):
        b = batch(i) if callable(batch) else batch
        idx = torch.randint(0, len(x), (b,), generator=g)
        xb, yb = x[idx], y[idx]
        if inject is not None:
            xb, yb = inject(i, xb, yb)
        if zero_grad:
            opt.zero_grad()
        out = forward(model, xb) if forward else model(xb)
        loss = loss_fn(out, yb)
        (sign * loss).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        mon.step(loss=loss.detach(), batch_size=b)
        if on_step:
            on_step(i)
        if eval_every and (i + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                mon.eval(loss=F.cross_entropy(model(xv), yv))
            model.train()


def _std(model: nn.Module | None = None, lr: float = 1e-3, opt: str = "adam", **kw: Any) -> Setup:
    model = model or mlp()
    o = torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam" else torch.optim.SGD(model.parameters(), lr=lr)
    return Setup(model, o, lambda mon: loop(model, o, mon, **kw), kw.get("steps", 120), {"num_classes": 10})


# ---------------------------------------------------------------------------- faults


def nan_input() -> Setup:
    def inject(i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if i >= 30:
            x = x.clone()
            x[0, 0] = math.nan
        return x, y
    return _std(inject=inject, steps=40)


def gradient_spike() -> Setup:
    return _std(inject=lambda i, x, y: (x * 1000.0 if i == 40 else x, y), steps=60)


def deep_sigmoid() -> Setup:
    torch.manual_seed(seed(0))
    return _std(mlp(nn.Sigmoid, width=32, depth=10), lr=1e-3, opt="sgd", steps=80)


def lr_too_high() -> Setup:
    torch.manual_seed(seed(0))
    return _std(lr=0.5, steps=60)


def lr_too_low() -> Setup:
    torch.manual_seed(seed(0))
    return _std(lr=1e-7, opt="sgd", steps=80)


def optimizer_over_copy() -> Setup:
    torch.manual_seed(seed(0))
    model, other = mlp(), mlp()
    opt = torch.optim.Adam(other.parameters(), lr=1e-3)  # built over another instance
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=40), 40, {"num_classes": 10})


def error_explodes() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def on_step(i: int) -> None:
        if i == 49:
            for grp in opt.param_groups:
                grp["lr"] = 20.0
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=80, on_step=on_step) or 50, 80,
                 {"num_classes": 10})


def error_goes_up() -> Setup:
    torch.manual_seed(seed(0))
    return _std(lr=1e-2, sign=-1.0, steps=60)  # the loss is maximised: a sign error


def labels_shuffled() -> Setup:
    torch.manual_seed(seed(0))
    _, y, _, _ = digits()
    labels = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed(3)))]
    # A plateau is judged against 30 steps of noise, and the finding flickers with it: it must hold at two
    # checkpoints in a row (every engine.max_steps_per_evaluation = 5 step numbers), 95-115 steps on seeds 0-2.
    return _std(lr=1e-3, labels=labels, steps=160)


def forgot_zero_grad() -> Setup:
    torch.manual_seed(seed(0))
    return _std(lr=1e-3, zero_grad=False, steps=30)


def softmax_wrong_dim() -> Setup:
    torch.manual_seed(seed(0))
    return _std(forward=lambda m, x: F.softmax(m(x), dim=0), steps=30)


def softmax_before_cross_entropy() -> Setup:
    torch.manual_seed(seed(0))
    return _std(forward=lambda m, x: F.softmax(m(x), dim=1), loss_fn=nn.CrossEntropyLoss(), steps=30)


def _regression(broadcast: bool, steps: int = 60) -> Setup:
    torch.manual_seed(seed(0))
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = torch.randn(8)
    g = torch.Generator().manual_seed(seed(2))

    def train(mon: Any) -> None:
        for _ in range(steps):
            x = torch.randn(64, 8, generator=g)
            y = x @ w + 0.1 * torch.randn(64, generator=g)
            opt.zero_grad()
            pred = model(x)
            loss = F.mse_loss(pred if broadcast else pred.squeeze(-1), y)
            loss.backward()
            opt.step()
            mon.step(loss=loss.detach(), batch_size=64)
    return Setup(model, opt, train, steps)


def detached_layer() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    return _std(model, forward=lambda m, x: m[2:](m[1](m[0](x).detach())), steps=30)


def eval_mode_left_on() -> Setup:
    torch.manual_seed(seed(0))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))
    return _std(model, on_step=lambda i: model.eval() if i == 29 else None, steps=50)


def bad_output_init() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    with torch.no_grad():
        model[-1].weight.mul_(30.0)
    return _std(model, steps=20)


def raw_inputs() -> Setup:
    torch.manual_seed(seed(0))
    return _std(raw=True, steps=30)


def dying_relu() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-20.0)
    return _std(model, steps=30)


def saturated_tanh() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp(nn.Tanh)
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    return _std(model, steps=30)


def dropout_before_bn() -> Setup:
    torch.manual_seed(seed(0))
    model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.5), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    return _std(model, steps=20)


def bn_small_batch() -> Setup:
    torch.manual_seed(seed(0))
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    return _std(model, batch=4, steps=20)


def lr_oscillating() -> Setup:
    """SGD at lr=30 on a linear classifier (~10x the rate that trains it best): expects LearningRateTooHigh.

    The fault is the step size; its signature that holds on every seed is the update ratio, 135-211x the
    ~1e-3 rule of thumb (seeds 0-2; it fires at warning at +25 on each). The oscillation it causes is a
    symptom, and ``healthd.engine.incidents`` makes LossOscillating a consequence of LearningRateTooHigh
    (Alertmanager mutes it while the cause fires), so the page names the learning rate either way.
    LossOscillating itself fires on seed 0 only, by its own definition: the loss does descend, from 2.3 to
    0.2-0.47 by step 60 (lr=3 reaches 0.06-0.08), swinging by 0.8-1.0x its level; on seed 1 its level falls
    under a quarter of the initial loss by step 30 (``min_level_fraction``: near convergence minibatch noise
    is large relative to the loss) and on seed 2 its net progress over the window exceeds one median swing
    at the third checkpoint in a row. LossOscillating's own fault, with no step size to blame, is
    ``corrupted_shard_alternating``.
    """
    torch.manual_seed(seed(0))
    model = nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=30.0)  # ~100x a sane rate for this problem
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=60), 60, {"num_classes": 10})


def corrupted_shard() -> Setup:
    """Batches alternate between a clean shard and a corrupted one (random labels: a broken preprocessing
    job or a mislabelled shard), with Adam at a sane 1e-3. The model fits the clean shard, so the loss
    jumps between its clean level and chance on every other step, and the swings grow as training goes on:
    "error oscillates: ... corrupted data" (J. Tobin, "Troubleshooting Deep Neural Networks"). No step
    size is at fault, so LossOscillating is the cause, not a learning rate's consequence."""
    torch.manual_seed(seed(0))

    def corrupt(i: int, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if i % 2 == 0:
            return xb, yb
        return xb, torch.randint(0, 10, yb.shape, generator=torch.Generator().manual_seed(seed(4) + i))
    return _std(lr=1e-3, inject=corrupt, steps=150)


def overfitting() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp(width=256)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    evals: list[float] = []

    def train(mon: Any) -> int:
        orig_eval = mon.eval

        def spy(loss: Any = None, **kw: Any) -> None:
            evals.append(float(loss))
            orig_eval(loss=loss, **kw)
        mon.eval = spy
        loop(model, opt, mon, steps=200, batch=32, train_size=40, eval_every=10)
        return 10 * (1 + min(range(len(evals)), key=evals.__getitem__))  # onset: the best validation loss
    return Setup(model, opt, train, 200, {"num_classes": 10})


def large_batch() -> Setup:
    torch.manual_seed(seed(0))
    s = _std(batch=512, steps=20)
    s.hints["dataset_size"] = 1400
    return s


def lr_not_scaled() -> Setup:
    torch.manual_seed(seed(0))
    s = _std(batch=lambda i: 32 if i < 30 else 256, steps=50)
    s.hints["dataset_size"] = 1400 * 20  # as if the data set were large: only the scaling is at fault
    return s


def _gpt_style(lr: float, steps: int = 200) -> Setup:
    # the GPT-style trainer's default: AdamW, linear warm-up then cosine decay, clip_grad_norm_(1.0)
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / (steps - warm))))
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=steps, clip=1.0, sched=sched), steps,
                 {"num_classes": 10})


def lr_too_high_adamw_clip() -> Setup:
    return _gpt_style(lr=3e-1)  # 100x the 3e-3 that trains this model (ctrl_adamw_clip_warmup_cos)


def _adaptive(opt_cls: type[torch.optim.Optimizer], lr: float, steps: int = 100) -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    opt = opt_cls(model.parameters(), lr=lr)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=steps), steps, {"num_classes": 10})


def lr_too_high_adadelta() -> Setup:
    return _adaptive(torch.optim.Adadelta, lr=100.0)  # 100x Adadelta's default lr=1.0


def lr_too_high_rmsprop() -> Setup:
    return _adaptive(torch.optim.RMSprop, lr=1e-1)  # 100x the 1e-3 that trains this model well


def lr_too_high_cnn_sgd() -> Setup:
    # a CNN with SGD at an LR far too high: oversized updates kill the network, whose updates then
    # look tiny (the damage, not a learning rate too low)
    torch.manual_seed(seed(0))
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=20.0, momentum=0.9)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=150), 150, {"num_classes": 10})


# ---------------------------------------------------------------------------- controls


def ctrl_mlp() -> Setup:
    torch.manual_seed(seed(0))
    return _std(steps=200, eval_every=50)


def ctrl_cnn_bn() -> Setup:
    torch.manual_seed(seed(0))
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10))
    return _std(model, lr=3e-3, steps=150, eval_every=50)


class SeqClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 32, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def ctrl_lstm_clip() -> Setup:
    torch.manual_seed(seed(0))
    model = SeqClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed(4))

    def train(mon: Any) -> None:
        for _ in range(150):
            x = torch.randn(32, 12, 4, generator=g)
            y = (x[:, :, 0].sum(1) > 0).long()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            mon.step(loss=loss.detach(), batch_size=32)
    return Setup(model, opt, train, 150, {"num_classes": 2})


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(8, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x) + self.pos))


def ctrl_transformer() -> Setup:
    torch.manual_seed(seed(0))
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    steps, warm = 150, 15
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / (steps - warm))))
    g = torch.Generator().manual_seed(seed(5))

    def train(mon: Any) -> None:
        for _ in range(steps):
            x = torch.randint(0, 16, (32, 8), generator=g)
            y = x.flip(1)  # learn to reverse the sequence
            opt.zero_grad()
            loss = F.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1))
            loss.backward()
            opt.step()
            sched.step()
            mon.step(loss=loss.detach(), batch_size=32)
    return Setup(model, opt, train, steps, {"num_classes": 16})


def ctrl_regression() -> Setup:
    return _regression(broadcast=False, steps=100)


def ctrl_sgd_momentum_wd() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=150, eval_every=50), 150, {"num_classes": 10})


def ctrl_grad_accumulation() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y, _, _ = digits()
    g = torch.Generator().manual_seed(seed(6))

    def train(mon: Any) -> None:
        for _ in range(100):
            for _ in range(4):  # four micro-batches per optimizer step
                idx = torch.randint(0, len(x), (16,), generator=g)
                loss = F.cross_entropy(model(x[idx]), y[idx]) / 4
                loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss=4 * loss.detach(), batch_size=64)
    return Setup(model, opt, train, 100, {"num_classes": 10, "grad_accumulation_steps": 4})


def ctrl_bf16_autocast() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def fwd(m: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(xb).float()
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=150, forward=fwd), 150, {"num_classes": 10})


# ---------------------------------------------------------------------------- controls from real programs
# Each one is a habit of real training code that tripped a rule once (see tests/healthd/rules/*_real_programs.py).


def _epochs(model: nn.Module, opt: torch.optim.Optimizer, mon: Any, *, epochs: int, batch: int, train_size: int,
            sched: Any = None, per_epoch_sched: bool = False, clip: float | None = None,
            loss_fn: Callable[..., torch.Tensor] = F.cross_entropy, accumulate: int = 1) -> None:
    """Epochs of a shuffling DataLoader with drop_last=False: a short last batch every epoch."""
    x, y, _, _ = digits()
    data = torch.utils.data.TensorDataset(x[:train_size], y[:train_size])
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=False,
                                         generator=torch.Generator().manual_seed(seed(7)))
    for _ in range(epochs):
        micro = 0
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            (loss / accumulate).backward()
            micro += 1
            if micro % accumulate:
                continue
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
            if sched is not None and not per_epoch_sched:
                sched.step()
            mon.step(loss=loss.detach(), batch_size=len(xb) * accumulate)
        if sched is not None and per_epoch_sched:
            sched.step()


def ctrl_epoch_partial_batch() -> Setup:
    # 1000 examples in batches of 64: 15 full batches and one of 40 each epoch (drop_last=False)
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, opt, lambda mon: _epochs(model, opt, mon, epochs=10, batch=64, train_size=1000), 160,
                 {"num_classes": 10, "dataset_size": 1000})


def ctrl_epoch_tiny_last_batch() -> Setup:
    # 1288 examples in batches of 128: the last batch of each epoch has 8 (16x smaller); step LR decay
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    return Setup(model, opt, lambda mon: _epochs(model, opt, mon, epochs=14, batch=128, train_size=1288, sched=sched,
                                                 per_epoch_sched=True), 154, {"num_classes": 10, "dataset_size": 1288})


def ctrl_converges_to_zero() -> Setup:
    # a wide MLP memorises 256 examples: the loss goes to ~1e-3 and minibatch noise dominates it
    torch.manual_seed(seed(0))
    model = mlp(width=256)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=400, batch=32, train_size=256), 400,
                 {"num_classes": 10})


def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def ctrl_cnn_sgd_momentum_converged() -> Setup:
    # SGD + momentum + BatchNorm, trained to a tiny loss on a subset: heavy-tailed gradient norms
    torch.manual_seed(seed(0))
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=300, batch=32, train_size=300), 300,
                 {"num_classes": 10})


def ctrl_one_cycle() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=200)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=200, sched=sched), 200, {"num_classes": 10})


def ctrl_cosine_clipped_label_smoothing() -> Setup:
    # active clipping (max norm below the typical norm), label smoothing (loss floor ~0.5), cosine decay
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    smooth = nn.CrossEntropyLoss(label_smoothing=0.1)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=200, loss_fn=smooth, clip=0.25, sched=sched),
                 200, {"num_classes": 10})


def ctrl_adamw_clip_warmup_cosine() -> Setup:
    # the GPT-style trainer at a sane LR: the healthy twin of lr_too_high_adamw_clip
    return _gpt_style(lr=3e-3)


def ctrl_strong_weight_decay() -> Setup:
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-2)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=200), 200, {"num_classes": 10})


def ctrl_accumulation_epochs() -> Setup:
    # gradient accumulation over 4 micro-batches of 16, from an epoch loader with a short last batch
    torch.manual_seed(seed(0))
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Setup(model, opt, lambda mon: _epochs(model, opt, mon, epochs=12, batch=16, train_size=700, accumulate=4),
                 130, {"num_classes": 10, "grad_accumulation_steps": 4})


# ---------------------------------------------------------------------------- controls with several models


def critic_step(gen: nn.Module, disc: nn.Module, opt_d: torch.optim.Optimizer, x: torch.Tensor,
                g: torch.Generator, wgan: bool) -> torch.Tensor:
    """One discriminator (critic) step of the digits GAN on a real and a detached fake batch of 64;
    returns its loss, detached. ``wgan``: the critic loss and weight clipping (WGAN)."""
    real = x[torch.randint(0, len(x), (64,), generator=g)]
    fake = gen(torch.randn(64, 16, generator=g))
    opt_d.zero_grad()
    if wgan:
        loss_d = -disc(real).mean() + disc(fake.detach()).mean()  # real first, as in the WGAN paper's code
    else:
        loss_d = (F.binary_cross_entropy_with_logits(disc(real), torch.ones(64, 1))
                  + F.binary_cross_entropy_with_logits(disc(fake.detach()), torch.zeros(64, 1)))
    loss_d.backward()
    opt_d.step()
    if wgan:
        with torch.no_grad():
            for p in disc.parameters():
                p.clamp_(-0.05, 0.05)
    return loss_d.detach()


def _gan(critic_steps: int) -> Setup:
    """A GAN on digits, monitored on its discriminator/critic: the generator's loss flows back through it
    after its step (gradients that are not stale), and its second forward each step is the fake pass."""
    torch.manual_seed(seed(0))
    gen = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh())
    disc = mlp(out=1)
    wgan = critic_steps > 1
    opt_g = (torch.optim.RMSprop(gen.parameters(), lr=5e-5) if wgan
             else torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999)))
    opt_d = (torch.optim.RMSprop(disc.parameters(), lr=5e-5) if wgan
             else torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999)))
    x = digits()[0].clamp(-1, 1)
    g = torch.Generator().manual_seed(seed(1))
    steps = 150

    def train(mon: Any) -> None:
        for _ in range(steps // critic_steps):
            for _ in range(critic_steps):
                mon.step(loss=critic_step(gen, disc, opt_d, x, g, wgan), batch_size=64)
            gen.zero_grad()
            fake = gen(torch.randn(64, 16, generator=g))
            loss_g = (-disc(fake).mean() if wgan
                      else F.binary_cross_entropy_with_logits(disc(fake), torch.ones(64, 1)))
            loss_g.backward()  # leaves gradients on the discriminator until its next zero_grad
            opt_g.step()
    return Setup(disc, opt_d, train, steps)


def ctrl_gan_alternating() -> Setup:
    return _gan(1)


def ctrl_wgan_critic_x5() -> Setup:
    return _gan(5)


def ctrl_distillation_frozen_teacher() -> Setup:
    torch.manual_seed(seed(0))
    teacher = mlp(width=128)
    opt_t = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    loop(teacher, opt_t, _Silent(), steps=150)
    teacher.requires_grad_(False).eval()
    student = mlp(width=32)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    ema = mlp(width=32).requires_grad_(False)
    ema.load_state_dict(student.state_dict())

    def distill(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return out  # the loss is computed in forward below

    def forward(model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(teacher(xb) / 2.0, -1)
        return F.kl_div(F.log_softmax(model(xb) / 2.0, -1), soft, reduction="batchmean")

    def on_step(i: int) -> None:
        with torch.no_grad():
            for pe, ps in zip(ema.parameters(), student.parameters(), strict=True):
                pe.lerp_(ps, 0.01)
    return Setup(student, opt, lambda mon: loop(student, opt, mon, steps=150, forward=forward,
                                                loss_fn=distill, on_step=on_step), 150)


def ctrl_fine_tune_pretrained() -> Setup:
    """Train a small model, save it, reload it into a fresh one and fine-tune it at a lower rate:
    its first loss is far below chance and it improves slowly."""
    import io

    torch.manual_seed(seed(0))
    pre = mlp()
    loop(pre, torch.optim.Adam(pre.parameters(), lr=1e-3), _Silent(), steps=300)
    buf = io.BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    model = mlp()
    model.load_state_dict(torch.load(buf, weights_only=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Setup(model, opt, lambda mon: loop(model, opt, mon, steps=200), 200,
                 {"num_classes": 10, "fine_tune": True})


class _Silent:
    """A monitor stand-in for pre-training before the monitored run starts."""

    def step(self, **kw: Any) -> None:
        pass

    def eval(self, **kw: Any) -> None:
        pass


SCENARIOS: tuple[Scenario, ...] = (
    # rules of the foundation issue
    Scenario("nan_input", "NonFiniteValues", nan_input, onset=30, fast=True),
    Scenario("gradient_spike", "ExplodingGradients", gradient_spike, onset=40),
    Scenario("deep_sigmoid_stack", "VanishingGradients", deep_sigmoid),
    Scenario("lr_too_high_adam", "LearningRateTooHigh", lr_too_high),
    Scenario("lr_too_low_sgd", "LearningRateTooLow", lr_too_low),
    Scenario("optimizer_over_copy", "WeightsNotUpdating", optimizer_over_copy, fast=True),
    # The loss turns NaN 5 steps after the 400x learning rate: the page that names the cause before the NaN
    # is the gradient's (LossDiverging no longer judges a window that straddles the NaN).
    Scenario("error_explodes", "ExplodingGradients", error_explodes, onset=50),
    # the seeds' classics
    Scenario("error_goes_up_sign_flip", "LossDiverging", error_goes_up),
    Scenario("labels_shuffled", "LossPlateau", labels_shuffled),
    Scenario("forgot_zero_grad", "MissingZeroGrad", forgot_zero_grad, fast=True),
    Scenario("softmax_wrong_dim", "SoftmaxBeforeLoss", softmax_wrong_dim, fast=True),
    # the checklist rules
    Scenario("softmax_before_ce", "SoftmaxBeforeLoss", softmax_before_cross_entropy),
    Scenario("regression_broadcast", "LossInputBroadcast", lambda: _regression(broadcast=True), fast=True),
    Scenario("detached_layer", "GradientsNotFlowing", detached_layer, fast=True),
    Scenario("eval_mode_left_on", "EvalModeDuringTraining", eval_mode_left_on, onset=30, fast=True),
    Scenario("bad_output_init", "InitialLossUnexpected", bad_output_init, fast=True),
    Scenario("raw_pixel_inputs", "InputNotNormalized", raw_inputs, fast=True),
    Scenario("dying_relu_bias", "DeadActivations", dying_relu, fast=True),
    Scenario("saturated_tanh_init", "SaturatedActivations", saturated_tanh, fast=True),
    Scenario("dropout_before_bn", "DropoutBeforeBatchNorm", dropout_before_bn, fast=True),
    Scenario("bn_batch_of_4", "BatchNormSmallBatch", bn_small_batch, fast=True),
    Scenario("lr_oscillating_sgd", "LearningRateTooHigh", lr_oscillating, fast=True),  # see its docstring
    Scenario("corrupted_shard_alternating", "LossOscillating", corrupted_shard),
    Scenario("overfit_40_examples", "Overfitting", overfitting),
    Scenario("batch_37pct_of_data", "LargeBatchGeneralization", large_batch, fast=True),
    Scenario("batch_8x_lr_same", "LearningRateNotScaled", lr_not_scaled, onset=30, fast=True),
    # the learning rate too high under the optimizers real trainers use
    Scenario("lr_too_high_adamw_clip", "LearningRateTooHigh", lr_too_high_adamw_clip),
    Scenario("lr_too_high_adadelta", "LearningRateTooHigh", lr_too_high_adadelta),
    Scenario("lr_too_high_rmsprop", "LearningRateTooHigh", lr_too_high_rmsprop),
    Scenario("lr_too_high_cnn_sgd", "LearningRateTooHigh", lr_too_high_cnn_sgd),
    # healthy controls: nothing above info
    Scenario("ctrl_mlp_adam", None, ctrl_mlp, fast=True),
    Scenario("ctrl_cnn_batchnorm", None, ctrl_cnn_bn),
    Scenario("ctrl_lstm_clipping", None, ctrl_lstm_clip),
    Scenario("ctrl_transformer_warmup_cos", None, ctrl_transformer),
    Scenario("ctrl_regression_mse", None, ctrl_regression, fast=True),
    Scenario("ctrl_sgd_momentum_wd", None, ctrl_sgd_momentum_wd),
    Scenario("ctrl_grad_accumulation", None, ctrl_grad_accumulation, fast=True),
    Scenario("ctrl_bf16_autocast", None, ctrl_bf16_autocast),
    # healthy controls from real programs
    Scenario("ctrl_epoch_partial_batch", None, ctrl_epoch_partial_batch),
    Scenario("ctrl_epoch_tiny_last_batch", None, ctrl_epoch_tiny_last_batch),
    Scenario("ctrl_converges_to_zero", None, ctrl_converges_to_zero),
    Scenario("ctrl_cnn_sgd_momentum_conv", None, ctrl_cnn_sgd_momentum_converged),
    Scenario("ctrl_one_cycle", None, ctrl_one_cycle),
    Scenario("ctrl_cos_clip_smoothing", None, ctrl_cosine_clipped_label_smoothing),
    Scenario("ctrl_strong_weight_decay", None, ctrl_strong_weight_decay),
    Scenario("ctrl_adamw_clip_warmup_cos", None, ctrl_adamw_clip_warmup_cosine),
    Scenario("ctrl_accumulation_epochs", None, ctrl_accumulation_epochs),
    # healthy controls with several models, optimizers or pretrained weights
    Scenario("ctrl_gan_alternating", None, ctrl_gan_alternating),
    Scenario("ctrl_wgan_critic_x5", None, ctrl_wgan_critic_x5),
    Scenario("ctrl_distillation_teacher", None, ctrl_distillation_frozen_teacher),
    Scenario("ctrl_fine_tune_pretrained", None, ctrl_fine_tune_pretrained),
)
