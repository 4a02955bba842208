"""Overhead of the healthd client on the training step: with vs without the monitor, same process.

Method: two identical copies of the model and optimizer (same seed) train on the same synthetic
batches; one has ``healthd_client.attach`` on it, the other not. They run in alternating blocks of
``--block-steps`` steps (A B A B ...), so drift in machine load hits both alike. A block's time is
taken around the whole block (one ``torch.cuda.synchronize()`` at each end on GPU, none inside, so
the monitor's asynchronous copies are charged where they really cost). The per-step time is the
median over blocks of block time / steps; overhead = monitored / baseline - 1.

Reports go to a null transport (the sender thread still JSON-encodes every batch) unless
``--server URL`` names a real healthd. The monitor's own memory is ``monitor.memory_overhead_bytes()``.

``--auto``: auto-attach (``HEALTHD_AUTO=1``, the unmodified loop) against an explicit ``attach`` (the
same loop plus ``monitor.step``) and against no healthd. Auto-attach's hooks are process-global, so
each way runs in a process of its own (``--child``), in interleaved rounds (none, explicit, auto, then
rotated), all sending to one local HTTP sink that accepts every batch. Per process: the median step time
over blocks after warm-up, and the start-up cost (spawn to the end of the first step: interpreter,
imports, building the model, attaching, the first step). Overheads are per round against that round's
no-healthd run; the medians over rounds are printed with the load average.
``--gan``: several models and optimizers in one process (a GAN's alternating step: the discriminator
steps on real and detached fake batches, then the generator's loss flows back through the
discriminator). Three identical copies (same seed) run in rotating block order, each block's arms back
to back: unmonitored, one monitor (the generator's stream), two monitors (generator and discriminator
streams, as ``attach(stream=...)`` documents). Overheads are medians over blocks of the paired ratio
arm / unmonitored in the same block, so load that drifts between blocks cancels; the 1-minute load
average before and after is printed, since other processes on the machine inflate everything.
``--dist fsdp2,ddp``: sharded against replicated data parallelism. Each arm is a ``torchrun`` job of its own
(2 ranks, gloo on CPU, one thread per rank): FSDP2 unmonitored, FSDP2 monitored, DDP unmonitored, DDP monitored,
the order rotated between rounds. The model is a small GPT (``TinyGPT``) whose blocks are each ``fully_shard``ed,
then the root (FSDP2), or the same model in ``DistributedDataParallel``; AdamW; reports go to a null transport.
Per arm: the median over blocks of the step time (the slower rank's: collectives wait for it), after warm-up.
Overheads are medians over rounds of monitored / unmonitored of the same strategy in the same round. Memory:
``monitor.memory_overhead_bytes()`` (the largest over ranks), cross-checked by the processes' RSS: its growth
from just before attach to the end, and the peak RSS, each monitored minus unmonitored (mean over ranks,
median over rounds; allocator noise of a few MiB is expected). The load average before and after is printed.

Usage::

    python bench/overhead.py --gan --blocks 12     # one vs two monitors on a GAN step
    python bench/overhead.py                       # CPU models
    python bench/overhead.py --device cuda         # GPU models (GPT-2-small-sized, ResNet-ish CNN)
    python bench/overhead.py --json out.json --blocks 20 --block-steps 10
    python bench/overhead.py --auto --workloads mlp --rounds 5   # auto-attach vs explicit attach
    python bench/overhead.py --compile both        # each workload eager, then compiled (model.compile())
    python bench/overhead.py --dist fsdp2,ddp --rounds 3   # FSDP2 vs DDP, torchrun jobs of 2 ranks (CPU)

Compiled case: both copies are compiled in place (``model.compile()``, inductor) before attach, and
warm up (compile) before the first timed block; healthd then measures what it can outside the
graph (gradients, update ratio, loss) and its forward inspections say they are blind.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

import healthd_client
from healthd_client import MonitorConfig

# Every-step monitoring: all quantities at every step (the default measures update ratio and
# non-finite params every 10 steps).
EVERY_STEP = dict(heavy_every_steps=1, grad_norm_every_steps=1, inspect_every_steps=1)


class NullTransport:
    """Accepts every batch (what a healthy, infinitely fast healthd would answer)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.batches = 0

    def send(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, str]:
        self.bytes += len(body)
        self.batches += 1
        return 200, json.dumps({"accepted": len(json.loads(body)["reports"])})


# ---------------------------------------------------------------- models on synthetic data
class MLP(nn.Module):
    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """A ResNet-ish CNN: conv-BN-ReLU stages with residual blocks (ResNet-50 is not installable here)."""

    def __init__(self, width: int = 32, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
        for stage in range(3):
            for _ in range(blocks):
                layers.append(_Residual(c))
            if stage < 2:
                layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU()]
                c *= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class TinyGPT(nn.Module):
    """A decoder-only transformer (causal mask); GPT-2-small-sized with the defaults of ``gpt2_small``."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(n, device=idx.device))
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


@dataclass(frozen=True)
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.device, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lr: float = 1e-3


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _images(batch: int, size: int) -> Callable[[torch.device, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(device: torch.device, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        return x, torch.randint(0, 10, (batch,), generator=g).to(device)

    return make


def _tokens(batch: int, seq: int, vocab: int) -> Callable[[torch.device, torch.Generator],
                                                          tuple[torch.Tensor, torch.Tensor]]:
    def make(device: torch.device, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
        return t[:, :-1], t[:, 1:]

    return make


def _flat(batch: int) -> Callable[[torch.device, torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(device: torch.device, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch, 784, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)

    return make


CPU_WORKLOADS = {
    "mlp": Workload("mlp (784-512-512-10, batch 128)", lambda: MLP(512), _flat(128), _ce),
    "cnn": Workload("resnet-ish cnn (width 16, 32x32, batch 32)", lambda: SmallCNN(16, 1), _images(32, 32), _ce),
    "gpt-tiny": Workload("gpt tiny (2 layers d128, seq 64, batch 8)",
                         lambda: TinyGPT(4096, 128, 2, 4, 64), _tokens(8, 64, 4096), _ce),
}
GPU_WORKLOADS = {
    "gpt2-small": Workload("gpt2-small-sized (12 layers d768, seq 512, batch 8, bf16 autocast)",
                           lambda: TinyGPT(50257, 768, 12, 12, 512), _tokens(8, 512, 50257), _ce, lr=3e-4),
    "cnn-wide": Workload("resnet-ish cnn (width 64, 3x3 blocks, 64x64, batch 128)",
                         lambda: SmallCNN(64, 3), _images(128, 64), _ce),
}


# ---------------------------------------------------------------- measurement
@dataclass
class Result:
    workload: str
    device: str
    config: str
    params: int
    baseline_ms: float
    monitored_ms: float
    overhead_pct: float
    blocks: int
    block_steps: int
    monitor_memory_bytes: int
    reports_bytes_per_step: float
    compiled: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(w: Workload, device: torch.device, config: Mapping[str, Any], *, blocks: int, block_steps: int,
            warmup_steps: int = 5, server: str | None = None, config_name: str = "",
            compiled: bool = False) -> Result:
    """Alternate monitored / unmonitored blocks; see the module docstring."""
    torch.manual_seed(0)
    base_model = w.make_model().to(device)
    mon_model = copy.deepcopy(base_model)
    if compiled:
        base_model.compile()
        mon_model.compile()
        warmup_steps = max(warmup_steps, 10)  # the first steps compile (and a step-1 variant may too)
    base_opt = torch.optim.AdamW(base_model.parameters(), lr=w.lr)
    mon_opt = torch.optim.AdamW(mon_model.parameters(), lr=w.lr)
    transport = NullTransport()
    monitor = healthd_client.attach(
        mon_model, mon_opt, job="bench-overhead", server=server,
        transport=None if server else transport,
        config=MonitorConfig(**{"heartbeat_seconds": 5.0, **config}),
    )
    g = torch.Generator().manual_seed(1)
    batches = [w.make_batch(device, g) for _ in range(4)]
    amp = device.type == "cuda"

    def run(model: nn.Module, opt: torch.optim.Optimizer, mon: Any, steps: int, start: int) -> None:
        for i in range(steps):
            x, y = batches[(start + i) % len(batches)]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = w.loss(model(x), y)
            loss.backward()
            opt.step()
            if mon is not None:
                mon.step(loss=loss, batch_size=len(x))

    run(base_model, base_opt, None, warmup_steps, 0)
    run(mon_model, mon_opt, monitor, warmup_steps, 0)
    _sync(device)
    times: dict[str, list[float]] = {"base": [], "mon": []}
    for b in range(blocks):
        order = (("base", base_model, base_opt, None), ("mon", mon_model, mon_opt, monitor))
        for key, model, opt, mon in (order if b % 2 == 0 else order[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            run(model, opt, mon, block_steps, b * block_steps)
            _sync(device)
            times[key].append((time.perf_counter() - t0) / block_steps)
    memory = monitor.memory_overhead_bytes()
    steps_monitored = warmup_steps + blocks * block_steps
    monitor.close()
    base_ms = statistics.median(times["base"]) * 1e3
    mon_ms = statistics.median(times["mon"]) * 1e3
    return Result(
        workload=w.name, device=str(device), config=config_name,
        params=sum(p.numel() for p in base_model.parameters()),
        baseline_ms=base_ms, monitored_ms=mon_ms, overhead_pct=100.0 * (mon_ms / base_ms - 1.0),
        blocks=blocks, block_steps=block_steps, monitor_memory_bytes=memory,
        reports_bytes_per_step=transport.bytes / steps_monitored, compiled=compiled,
    )


# ---------------------------------------------------------------- auto-attach vs explicit attach
WAYS = ("none", "explicit", "auto")


def child(way: str, w: Workload, *, blocks: int, block_steps: int, warmup_steps: int = 5) -> dict[str, float]:
    """One way in this process (``--child``): the training loop as a script would write it."""
    torch.manual_seed(0)
    model = w.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr)
    monitor = healthd_client.attach(model, opt, job="bench-overhead") if way == "explicit" else None
    g = torch.Generator().manual_seed(1)
    batches = [w.make_batch(torch.device("cpu"), g) for _ in range(4)]

    def run(steps: int, start: int) -> None:
        for i in range(steps):
            x, y = batches[(start + i) % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss = w.loss(model(x), y)
            loss.backward()
            opt.step()
            if monitor is not None:
                monitor.step(loss=loss, batch_size=len(x))

    run(1, 0)
    first_step_done = time.time()
    run(warmup_steps, 1)
    times = []
    for b in range(blocks):
        t0 = time.perf_counter()
        run(block_steps, b * block_steps)
        times.append((time.perf_counter() - t0) / block_steps)
    auto_on = sys.modules.get("healthd_client.auto")
    attached = monitor is not None or (auto_on is not None and getattr(auto_on, "_installed", None) is not None
                                       and auto_on._installed.monitor is not None)
    if monitor is not None:
        monitor.close()
    return {"first_step_done": first_step_done, "step_ms": statistics.median(times) * 1e3, "attached": attached}


def _sink() -> tuple[str, Callable[[], None]]:
    """A local HTTP server that accepts every report batch, as a fast healthd would."""
    import http.server
    import threading

    class Accept(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            answer = json.dumps({"accepted": len(json.loads(body or b'{"reports": []}')["reports"])}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Accept)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server.shutdown


def auto_vs_explicit(name: str, *, rounds: int, blocks: int, block_steps: int, threads: int) -> dict[str, Any]:
    import os
    import subprocess
    from pathlib import Path

    from healthd_client import launcher

    url, stop = _sink()
    here = Path(__file__).resolve()
    base = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHD_")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(here.parents[1]), base.get("PYTHONPATH", "")) if p)
    base.update(HEALTHD_SERVER=url, HEALTHD_JOB="bench-overhead")
    auto_env = launcher.environment(launcher.parser().parse_args(["--", "python"]), ["python"], base)
    rows: list[dict[str, dict[str, float]]] = []
    try:
        for r in range(rounds):
            row = {}
            for way in WAYS[r % 3:] + WAYS[:r % 3]:
                cmd = [sys.executable, str(here), "--child", way, "--workloads", name, "--blocks", str(blocks),
                       "--block-steps", str(block_steps), "--threads", str(threads)]
                spawned = time.time()
                out = subprocess.run(cmd, env=auto_env if way == "auto" else base, capture_output=True, text=True,
                                     check=True, timeout=600).stdout
                got = json.loads(out.strip().splitlines()[-1])
                if way != "none" and not got["attached"]:
                    raise RuntimeError(f"{way}: no monitor attached")
                row[way] = {"step_ms": got["step_ms"], "startup_s": got["first_step_done"] - spawned}
            rows.append(row)
    finally:
        stop()

    def med(f: Callable[[dict[str, dict[str, float]]], float]) -> float:
        return statistics.median(f(row) for row in rows)

    return {
        "workload": CPU_WORKLOADS[name].name, "rounds": rounds, "blocks": blocks, "block_steps": block_steps,
        "step_ms": {way: med(lambda row, way=way: row[way]["step_ms"]) for way in WAYS},
        "startup_s": {way: med(lambda row, way=way: row[way]["startup_s"]) for way in WAYS},
        "explicit_overhead_pct": med(lambda row: 100 * (row["explicit"]["step_ms"] / row["none"]["step_ms"] - 1)),
        "auto_overhead_pct": med(lambda row: 100 * (row["auto"]["step_ms"] / row["none"]["step_ms"] - 1)),
        "auto_minus_explicit_pp": med(lambda row: 100 * (row["auto"]["step_ms"] - row["explicit"]["step_ms"])
                                      / row["none"]["step_ms"]),
        "load_average": os.getloadavg(),
        "rows": rows,
    }

# ---------------------------------------------------------------- a GAN: two models, two optimizers, one process
class _Generator(nn.Module):
    def __init__(self, z: int = 64, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 784), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class _Discriminator(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, width), nn.LeakyReLU(0.2), nn.Linear(width, width),
                                 nn.LeakyReLU(0.2), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class GanResult:
    device: str
    config: str
    params: int
    none_ms: float
    one_monitor_ms: float
    two_monitors_ms: float
    one_monitor_pct: float  # median over blocks of one / none - 1 in the same block
    two_monitors_pct: float
    second_monitor_pct: float  # median over blocks of two / one - 1: what the second stream adds
    blocks: int
    block_steps: int
    load_avg_1m_before: float
    load_avg_1m_after: float


class _GanArm:
    """One copy of the GAN with 0, 1 (generator) or 2 (generator, discriminator) monitors."""

    def __init__(self, device: torch.device, monitors: int, config: Mapping[str, Any], server: str | None,
                 transport: NullTransport) -> None:
        torch.manual_seed(0)
        self.g, self.d = _Generator().to(device), _Discriminator().to(device)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        cfg = MonitorConfig(**{"heartbeat_seconds": 5.0, **config})
        job = f"bench-overhead-gan-{monitors}"

        def attach(model: nn.Module, opt: torch.optim.Optimizer, stream: str) -> Any:
            return healthd_client.attach(model, opt, job=job, server=server, transport=None if server else transport,
                                         stream=stream, loss_kind="adversarial", config=cfg)

        self.mon_g = attach(self.g, self.opt_g, "generator") if monitors >= 1 else None
        self.mon_d = attach(self.d, self.opt_d, "discriminator") if monitors >= 2 else None

    def step(self, real: torch.Tensor, z: torch.Tensor) -> None:
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1, device=real.device), torch.zeros(len(real), 1, device=real.device)
        fake = self.g(z)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = bce(self.d(real), ones) + bce(self.d(fake.detach()), zeros)
        loss_d.backward()
        self.opt_d.step()
        if self.mon_d is not None:
            self.mon_d.step(loss=loss_d, batch_size=len(real))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g = bce(self.d(fake), ones)  # through the discriminator: its grads are the generator's loss's
        loss_g.backward()
        self.opt_g.step()
        if self.mon_g is not None:
            self.mon_g.step(loss=loss_g, batch_size=len(real))

    def close(self) -> None:
        for m in (self.mon_d, self.mon_g):
            if m is not None:
                m.close()


def measure_gan(device: torch.device, config: Mapping[str, Any], *, blocks: int, block_steps: int,
                warmup_steps: int = 5, server: str | None = None, config_name: str = "",
                batch: int = 64) -> GanResult:
    """No monitor vs one vs two on the same GAN step; see the module docstring."""
    load_before = os.getloadavg()[0]
    transport = NullTransport()
    arms = {n: _GanArm(device, n, config, server, transport) for n in (0, 1, 2)}
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(batch, 784, generator=g).mul(2).sub(1).to(device), torch.randn(batch, 64, generator=g)
             .to(device)) for _ in range(4)]

    def run(arm: _GanArm, steps: int, start: int) -> None:
        for i in range(steps):
            arm.step(*data[(start + i) % len(data)])

    for arm in arms.values():
        run(arm, warmup_steps, 0)
    _sync(device)
    orders = list(itertools.permutations(arms))  # every arm takes every position equally often
    times: dict[int, list[float]] = {n: [] for n in arms}
    for b in range(blocks):
        for n in orders[b % len(orders)]:
            _sync(device)
            t0 = time.perf_counter()
            run(arms[n], block_steps, b * block_steps)
            _sync(device)
            times[n].append((time.perf_counter() - t0) / block_steps)
    for arm in arms.values():
        arm.close()

    def paired(a: int, b: int) -> float:
        return 100.0 * (statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)) - 1.0)

    ms = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    return GanResult(
        device=str(device), config=config_name,
        params=sum(p.numel() for m in (arms[0].g, arms[0].d) for p in m.parameters()),
        none_ms=ms[0], one_monitor_ms=ms[1], two_monitors_ms=ms[2],
        one_monitor_pct=paired(1, 0), two_monitors_pct=paired(2, 0), second_monitor_pct=paired(2, 1),
        blocks=blocks, block_steps=block_steps, load_avg_1m_before=load_before,
        load_avg_1m_after=os.getloadavg()[0],
    )


# ---------------------------------------------------------------- FSDP2 vs DDP: torchrun jobs of 2 ranks
DIST_ARMS = ("fsdp2-none", "fsdp2-monitored", "ddp-none", "ddp-monitored")
# name -> (TinyGPT's vocab, d, layers, heads, seq, batch per rank)
DIST_SIZES = {
    "default": (4096, 128, 4, 4, 64, 8),
    "toy": (64, 16, 2, 2, 8, 2),
}


def _rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def dist_child(arm: str, size: str, *, blocks: int, block_steps: int, warmup_steps: int) -> dict[str, Any]:
    """One arm in a torchrun job (``--dist-child``): a small GPT, each block ``fully_shard``ed then the root
    (FSDP2), or the same model in ``DistributedDataParallel``; AdamW; gloo on CPU, one thread per rank.

    Returns this rank's numbers; each rank writes its own file (printed lines of two ranks interleave in
    torchrun's output). Not gathered with ``all_gather_object``: under DDP that work's teardown in gloo's
    thread deadlocked against the process group's destructor at exit (torch 2.13, seen once in three runs)."""
    import resource

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    strategy, _, way = arm.partition("-")
    vocab, d, layers, heads, seq, batch = DIST_SIZES[size]
    torch.manual_seed(0)
    model: nn.Module = TinyGPT(vocab, d, layers, heads, seq)
    params = sum(p.numel() for p in model.parameters())
    if strategy == "fsdp2":
        for block in cast(nn.TransformerEncoder, cast(TinyGPT, model).blocks).layers:
            fully_shard(block)
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    batches = [_tokens(batch, seq, vocab)(torch.device("cpu"), g) for _ in range(4)]
    rss_before = _rss_bytes()
    transport = NullTransport()
    monitor = (healthd_client.attach(model, opt, job=f"bench-overhead-{strategy}", transport=transport,
                                     config=MonitorConfig(heartbeat_seconds=5.0))
               if way == "monitored" else None)

    def run(steps: int, start: int) -> None:
        for i in range(steps):
            x, y = batches[(start + i) % len(batches)]
            opt.zero_grad(set_to_none=True)
            loss = _ce(model(x), y)
            loss.backward()
            opt.step()
            if monitor is not None:
                monitor.step(loss=loss, batch_size=len(x))

    run(warmup_steps, 0)
    times = []
    for b in range(blocks):
        dist.barrier()  # each block starts together on both ranks
        t0 = time.perf_counter()
        run(block_steps, b * block_steps)
        times.append((time.perf_counter() - t0) / block_steps)
    mine = {
        "arm": arm, "rank": rank, "params": params,
        "step_ms": statistics.median(times) * 1e3,
        "monitor_memory_bytes": monitor.memory_overhead_bytes() if monitor is not None else 0,
        "rss_growth_bytes": _rss_bytes() - rss_before,  # from just before attach (or where it would be) to the end
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "disabled": monitor.disabled_quantities if monitor is not None else [],
    }
    if monitor is not None:
        monitor.close()
    mine["reports_bytes"] = transport.bytes  # after close(), which flushes what is queued
    dist.barrier()
    dist.destroy_process_group()
    return mine


def fsdp_vs_ddp(strategies: list[str], *, size: str, rounds: int, blocks: int, block_steps: int,
                warmup_steps: int, nproc: int = 2) -> dict[str, Any]:
    """Unmonitored and monitored arms of each strategy, each a ``torchrun`` job of its own, in rounds whose
    order rotates; overheads are paired per round (monitored / unmonitored of the same strategy)."""
    import subprocess
    import tempfile
    from pathlib import Path

    here = Path(__file__).resolve()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHD_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(here.parents[1]), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    arms = [a for a in DIST_ARMS if a.partition("-")[0] in strategies]
    load_before = os.getloadavg()
    rows: list[dict[str, dict[str, Any]]] = []
    for r in range(rounds):
        row = {}
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            port = _free_port()
            cmd = [str(torchrun), f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}",
                   str(here), "--dist-child", arm, "--dist-size", size, "--blocks", str(blocks),
                   "--block-steps", str(block_steps), "--warmup", str(warmup_steps)]
            with tempfile.TemporaryDirectory(prefix="healthd-bench-dist-") as out_dir:
                done = subprocess.run(cmd, env={**env, "BENCH_DIST_OUT": out_dir}, capture_output=True, text=True,
                                      timeout=600)
                if done.returncode != 0:
                    raise RuntimeError(f"{arm}: torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}"
                                       f"{done.stderr[-3000:]}")
                ranks = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(nproc)]
            # the slower rank sets the job's pace (the collectives wait for it)
            row[arm] = {"arm": arm, "params": ranks[0]["params"], "ranks": ranks,
                        "step_ms": max(got["step_ms"] for got in ranks)}
        rows.append(row)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    vocab, d, layers, heads, seq, batch = DIST_SIZES[size]
    model = f"TinyGPT(vocab {vocab}, d {d}, {layers} blocks, {heads} heads, seq {seq}), batch {batch} per rank"
    out: dict[str, Any] = {"size": size, "model": model, "params": rows[0][arms[0]]["params"], "ranks": nproc,
                           "rounds": rounds, "blocks": blocks, "block_steps": block_steps,
                           "warmup_steps": warmup_steps, "load_average_before": load_before}
    for s in strategies:
        none, mon = f"{s}-none", f"{s}-monitored"
        out[s] = {
            "none_ms": med([row[none]["step_ms"] for row in rows]),
            "monitored_ms": med([row[mon]["step_ms"] for row in rows]),
            "overhead_pct": med([100.0 * (row[mon]["step_ms"] / row[none]["step_ms"] - 1.0) for row in rows]),
            "monitor_memory_bytes": max(rk["monitor_memory_bytes"] for row in rows for rk in row[mon]["ranks"]),
            # cross-check: what the monitored job's ranks grew by beyond the unmonitored ones', per round
            "rss_growth_diff_bytes": med([statistics.mean(rk["rss_growth_bytes"] for rk in row[mon]["ranks"])
                                          - statistics.mean(rk["rss_growth_bytes"] for rk in row[none]["ranks"])
                                          for row in rows]),
            "max_rss_diff_bytes": med([statistics.mean(rk["max_rss_bytes"] for rk in row[mon]["ranks"])
                                       - statistics.mean(rk["max_rss_bytes"] for rk in row[none]["ranks"])
                                       for row in rows]),
            "disabled": sorted({q for row in rows for rk in row[mon]["ranks"] for q in rk["disabled"]}),
        }
    out["load_average_after"] = os.getloadavg()
    out["rows"] = rows
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workloads", default="", help="comma-separated names (default: all for the device)")
    ap.add_argument("--configs", default="default,every-step", help="default and/or every-step")
    ap.add_argument("--compile", default="none", choices=["none", "model", "both"],
                    help="model: compile both copies in place; both: eager, then compiled")
    ap.add_argument("--blocks", type=int, default=None, help="timed blocks (default 16; --dist: 8)")
    ap.add_argument("--block-steps", type=int, default=None, help="steps per block (default 10; --dist: 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--server", default=None, help="send to this healthd instead of a null transport")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--auto", action="store_true", help="auto-attach vs explicit attach vs none (CPU, processes)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="--auto: rounds of (none, explicit, auto) (default 5); --dist: rounds of its arms (default 3)")
    ap.add_argument("--child", choices=WAYS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gan", action="store_true", help="only the GAN step: no monitor vs one vs two")
    ap.add_argument("--dist", default="", help="comma-separated fsdp2,ddp: torchrun jobs of 2 ranks (gloo, CPU), "
                    "unmonitored vs monitored, in rotated rounds")
    ap.add_argument("--dist-size", default="default", choices=sorted(DIST_SIZES), help="--dist: the GPT's size")
    ap.add_argument("--warmup", type=int, default=5, help="--dist: steps before the timed blocks")
    ap.add_argument("--dist-child", choices=DIST_ARMS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dist_mode = bool(args.dist or args.dist_child)
    args.blocks = args.blocks or (8 if dist_mode else 16)
    args.block_steps = args.block_steps or (5 if dist_mode else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, CPU_WORKLOADS[args.workloads], blocks=args.blocks,
                               block_steps=args.block_steps)))
        return 0
    if args.dist_child:
        got = dist_child(args.dist_child, args.dist_size, blocks=args.blocks, block_steps=args.block_steps,
                         warmup_steps=args.warmup)
        with open(os.path.join(os.environ["BENCH_DIST_OUT"], f"rank{got['rank']}.json"), "w") as f:
            json.dump(got, f)
        return 0
    if args.dist:
        strategies = [s for s in args.dist.split(",") if s]
        unknown = set(strategies) - {a.partition("-")[0] for a in DIST_ARMS}
        if unknown or not strategies:
            ap.error(f"--dist takes fsdp2 and/or ddp, got {args.dist!r}")
        o = fsdp_vs_ddp(strategies, size=args.dist_size, rounds=args.rounds or 3, blocks=args.blocks,
                        block_steps=args.block_steps, warmup_steps=args.warmup)
        print(f"{o['model']}, {o['params']} params, {o['ranks']} ranks (gloo, CPU, 1 thread each), "
              f"{o['rounds']} rounds of {o['blocks']}x{o['block_steps']} steps", flush=True)
        for s in strategies:
            r = o[s]
            print(f"{s}: step ms none {r['none_ms']:.2f} monitored {r['monitored_ms']:.2f} "
                  f"overhead {r['overhead_pct']:+.2f}% (median over rounds of the paired ratio) "
                  f"monitor memory {r['monitor_memory_bytes'] / 1024:.0f} KiB "
                  f"rss growth diff {r['rss_growth_diff_bytes'] / 1024:.0f} KiB "
                  f"max rss diff {r['max_rss_diff_bytes'] / 1024:.0f} KiB "
                  f"not measured {','.join(r['disabled']) or '-'}", flush=True)
        print(f"load average before {o['load_average_before']} after {o['load_average_after']}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "dist": o}, f, indent=2)
        return 0
    if args.auto:
        out = [auto_vs_explicit(n, rounds=args.rounds or 5, blocks=args.blocks, block_steps=args.block_steps,
                                threads=args.threads)
               for n in ([n for n in args.workloads.split(",") if n] or ["mlp"])]
        for o in out:
            steps = "/".join(f"{o['step_ms'][w]:.2f}" for w in WAYS)
            starts = "/".join(f"{o['startup_s'][w]:.2f}" for w in WAYS)
            print(f"{o['workload']}: step ms none/explicit/auto "
                  f"{steps}; overhead explicit "
                  f"{o['explicit_overhead_pct']:+.2f}% auto {o['auto_overhead_pct']:+.2f}% "
                  f"(auto - explicit {o['auto_minus_explicit_pp']:+.2f} pp); start-up s none/explicit/auto "
                  f"{starts}; load average {o['load_average']}",
                  flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "auto": out}, f, indent=2)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    configs = {"default": {}, "every-step": EVERY_STEP}
    if args.gan:
        gan = []
        for cname in args.configs.split(","):
            r = measure_gan(device, configs[cname], blocks=args.blocks, block_steps=args.block_steps,
                            server=args.server, config_name=cname)
            gan.append(r)
            print(f"gan ({r.params} params, {device}) {cname:<10} none {r.none_ms:7.2f} ms  one monitor "
                  f"{r.one_monitor_ms:7.2f} ms ({r.one_monitor_pct:+.1f}%)  two monitors {r.two_monitors_ms:7.2f} ms "
                  f"({r.two_monitors_pct:+.1f}%)  second monitor {r.second_monitor_pct:+.1f}%  "
                  f"load avg {r.load_avg_1m_before:.2f} -> {r.load_avg_1m_after:.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                           "gan": [asdict(r) for r in gan]}, f, indent=2)
        return 0
    table = GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    names = [n for n in args.workloads.split(",") if n] or list(table)
    results = []
    modes = {"none": [False], "model": [True], "both": [False, True]}[args.compile]
    for name in names:
        for cname, compiled in ((c, m) for c in args.configs.split(",") for m in modes):
            r = measure(table[name], device, configs[cname], blocks=args.blocks, block_steps=args.block_steps,
                        server=args.server, config_name=cname, compiled=compiled)
            results.append(r)
            mode = "compiled" if compiled else "eager"
            print(f"{r.workload:<62} {cname:<10} {mode:<8} base {r.baseline_ms:8.2f} ms"
                  f"  monitored {r.monitored_ms:8.2f} ms"
                  f"  overhead {r.overhead_pct:+6.2f}%  monitor memory {r.monitor_memory_bytes / 1024:.0f} KiB"
                  f"  {r.reports_bytes_per_step:.0f} B/step", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda"
                       else "cpu", "threads": torch.get_num_threads(), "results": [asdict(r) for r in results]},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
