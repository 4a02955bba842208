"""bench/overhead.py --gan runs at a toy size (its numbers are not checked: this machine is shared)."""

from __future__ import annotations

import torch

from bench.overhead import NullTransport, _GanArm, measure_gan


def test_gan_arms_have_none_one_and_two_monitors_on_separate_streams() -> None:
    arms = [_GanArm(torch.device("cpu"), n, {}, None, NullTransport()) for n in (0, 1, 2)]
    try:
        assert [(a.mon_g is not None, a.mon_d is not None) for a in arms] == [(False, False), (True, False),
                                                                              (True, True)]
        two = arms[2]
        assert (two.mon_g.stream, two.mon_d.stream) == ("generator", "discriminator")
        assert [q.name for q in two.mon_g.quantities].count("gpu") == 1  # one GPU sampler per process
        assert "gpu" not in [q.name for q in two.mon_d.quantities]
    finally:
        for a in arms:
            a.close()


def test_measure_gan_runs_at_a_toy_size() -> None:
    r = measure_gan(torch.device("cpu"), {}, blocks=2, block_steps=1, warmup_steps=1, batch=4)
    assert min(r.none_ms, r.one_monitor_ms, r.two_monitors_ms) > 0 and r.blocks == 2
