"""Overhead of the healthd client on the training step: with vs without the monitor, same process.

Method: two identical copies of the model and optimizer (same seed) train on the same synthetic
batches; one has ``healthd_client.attach`` on it, the other not. They run in alternating blocks of
``--block-steps`` steps (A B A B ...), so drift in machine load hits both alike. A block's time is
taken around the whole block (one ``torch.cuda.synchronize()`` at each end on GPU, none inside, so
the monitor's asynchronous copies are charged where they really cost). The per-step time is the
median over blocks of block time / steps; overhead = monitored / baseline - 1.

Reports go to a null transport (the sender thread still JSON-encodes every batch) unless
``--server URL`` names a real healthd. The monitor's own memory is ``monitor.memory_overhead_bytes()``.

Usage::

    python bench/overhead.py                       # CPU models
    python bench/overhead.py --device cuda         # GPU models (GPT-2-small-sized, ResNet-ish CNN)
    python bench/overhead.py --json out.json --blocks 20 --block-steps 10
    python bench/overhead.py --compile both        # each workload eager, then compiled (model.compile())

Compiled case: both copies are compiled in place (``model.compile()``, inductor) before attach, and
warm up (compile) before the first timed block; healthd then measures what it can outside the
graph (gradients, update ratio, loss) and its forward inspections say they are blind.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workloads", default="", help="comma-separated names (default: all for the device)")
    ap.add_argument("--configs", default="default,every-step", help="default and/or every-step")
    ap.add_argument("--compile", default="none", choices=["none", "model", "both"],
                    help="model: compile both copies in place; both: eager, then compiled")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--block-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--server", default=None, help="send to this healthd instead of a null transport")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    table = GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    names = [n for n in args.workloads.split(",") if n] or list(table)
    configs = {"default": {}, "every-step": EVERY_STEP}
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
