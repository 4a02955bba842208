"""LearningRateNotScaled on batch sizes real loaders produce: a change is a sustained new level, not a dip."""

from __future__ import annotations

import random

import pytest

from healthd.rules.learning_rate_not_scaled import LearningRateNotScaled
from tests.healthd.factories import steps, window


def _epochs(full: int, last: int, batches: int, epochs: int) -> list[int]:
    """An epoch DataLoader with drop_last=False: ``batches - 1`` full batches, then a short one."""
    return ([full] * (batches - 1) + [last]) * epochs


def _tokens(n: int, seed: int, lo: int = 200, hi: int = 800) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


QUIET = {
    # the short last batch of each epoch, the window ending anywhere in the cycle
    "short_last_batch": _epochs(64, 8, 10, 10),
    "short_last_batch_at_end": _epochs(64, 8, 10, 10)[:-9],
    "short_last_batch_then_2": _epochs(64, 8, 10, 10)[:-8],
    "tiny_epoch_every_4th": _epochs(32, 4, 4, 25),
    # a sampler sharding unevenly: this rank's remainder is 1/3 of a batch, each epoch
    "uneven_shard": _epochs(48, 16, 7, 14),
    # variable-length batches (tokens per step)
    **{f"token_counts_{s}": _tokens(100, s) for s in range(5)},
    "token_counts_wide": _tokens(100, 7, 50, 1000),
}


@pytest.mark.parametrize("sizes", QUIET.values(), ids=QUIET.keys())
def test_no_change_on_healthy_loaders(sizes: list[int]) -> None:
    rule = LearningRateNotScaled()
    for end in range(4, len(sizes) + 1):  # every evaluation point of the run
        w = window(steps(end, batch_size=sizes[:end], lr=[0.1]))
        assert rule.evaluate(w) is None, (end, sizes[max(0, end - 10):end])


FIRES = {
    "fixed_32_to_256": [32] * 30 + [256] * 5,
    "fixed_256_to_32": [256] * 30 + [32] * 5,
    "epoch_loader_then_4x": _epochs(64, 8, 10, 3) + [256] * 5,
    "short_batch_inside_new_level": [32] * 30 + [128] * 9 + [16] + [128] * 3,
    "tokens_then_4x_sustained": _tokens(60, 1) + [4 * t for t in _tokens(25, 2)],
}


@pytest.mark.parametrize("sizes", FIRES.values(), ids=FIRES.keys())
def test_a_sustained_new_level_still_fires(sizes: list[int]) -> None:
    f = LearningRateNotScaled().evaluate(window(steps(len(sizes), batch_size=sizes, lr=[0.1])))
    assert f is not None and f.evidence["batch_ratio"] != pytest.approx(1.0)


def test_variable_sizes_need_a_longer_level() -> None:
    # token counts that dropped 4x three steps ago: not yet a level (a burst of short sequences can do that)
    sizes = _tokens(60, 3) + [t // 4 for t in _tokens(3, 4)]
    assert LearningRateNotScaled().evaluate(window(steps(len(sizes), batch_size=sizes, lr=[0.1]))) is None


def test_scaled_learning_rate_is_quiet() -> None:
    sizes = _epochs(64, 8, 10, 3) + [256] * 5
    lrs = [[0.1]] * 30 + [[0.4]] * 5
    assert LearningRateNotScaled().evaluate(window(steps(len(sizes), batch_size=sizes, lr=lrs))) is None
