"""The store's per-job distributed state: global batch size and the noise-scale estimate."""

from __future__ import annotations

from healthd.settings import StoreSettings
from healthd.state.store import Store
from healthd.wire.schema import AttachReport, Hints, StepReport


def test_global_batch_counts_ranks_and_accumulation() -> None:
    store = Store(StoreSettings())
    store.apply(AttachReport(job="j", rank=0, time=1.0, world_size=4, hints=Hints(grad_accumulation_steps=2)), 1.0)
    store.apply(StepReport(job="j", rank=2, time=2.0, step=0, batch_size=8), 2.0)
    assert store.jobs["j"].global_batch_size == 8 * 4 * 2
    assert store.job_window("j", 3.0).global_batch_size == 64


def test_noise_scale_from_rank_reports() -> None:
    store = Store(StoreSettings(noise_scale_ema_alpha=1.0))  # min_samples = 3
    store.apply(AttachReport(job="j", rank=0, time=1.0, world_size=4), 1.0)
    # |G_small|² = 2, |G_big|² = 1.25 with B_small = 1, B_big = 4: |G|² = 1, tr(Σ) = 1 (McCandlish A.1).
    for i in range(3):
        assert store.jobs["j"].noise.noise_scale is None  # fewer than min_samples so far
        store.apply(StepReport(job="j", rank=i, time=2.0, step=0, batch_size=1, grad_norm_local=2 ** 0.5,
                               grad_norm_allreduced=1.25 ** 0.5), 2.0)
    assert store.jobs["j"].noise.noise_scale is not None
    assert abs(store.jobs["j"].noise.noise_scale - 1.0) < 1e-9
    assert store.rank_window("j", 0).noise_scale == store.jobs["j"].noise.noise_scale


def test_single_process_job_has_no_noise_scale() -> None:
    store = Store(StoreSettings(noise_scale_ema_alpha=1.0))
    for i in range(5):
        store.apply(StepReport(job="j", rank=0, time=2.0, step=i, batch_size=4, grad_norm_local=1.0,
                               grad_norm_allreduced=1.0), 2.0)
    assert store.jobs["j"].noise.noise_scale is None and store.jobs["j"].global_batch_size == 4
