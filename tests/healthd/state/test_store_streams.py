"""Named streams in the store: two streams of one rank keep separate windows, meta and job windows."""

from __future__ import annotations

from healthd.settings import StoreSettings
from healthd.state.store import Store
from healthd.wire.schema import AttachReport, Hints
from tests.healthd.factories import step


def test_two_streams_of_one_rank_keep_separate_windows() -> None:
    store = Store(StoreSettings())
    for i in range(5):
        store.apply_steps([step(i, job="gan", stream="generator", loss=10.0 + i)], now=1.0)
        store.apply_steps([step(i, job="gan", stream="discriminator", loss=0.5)], now=1.0)
    store.apply_steps([step(0, job="gan", loss=3.0)], now=1.0)  # the job's unnamed stream
    g = store.rank_window("gan", 0, stream="generator")
    d = store.rank_window("gan", 0, stream="discriminator")
    assert g.values("loss") == [10.0, 11.0, 12.0, 13.0, 14.0] and g.stream == "generator"
    assert d.values("loss") == [0.5] * 5 and d.column("step") == [0, 1, 2, 3, 4]
    assert store.rank_window("gan", 0).values("loss") == [3.0] and store.jobs["gan"].ranks[0].steps_total == 1
    assert [(s.name, s.stream) for s in store] == [("gan", None), ("gan", "discriminator"), ("gan", "generator")]
    assert list(store.jobs) == ["gan"]  # one job: the caps and expiry count jobs


def test_job_windows_hold_one_streams_ranks_and_its_own_attach_hints() -> None:
    store = Store(StoreSettings())
    store.apply(AttachReport(job="gan", stream="generator", time=1.0, world_size=2,
                             hints=Hints(loss_kind="adversarial")), now=1.0)
    for rank in (0, 1):
        store.apply_steps([step(0, job="gan", rank=rank, stream="generator")], now=1.0)
    store.apply_steps([step(0, job="gan", rank=0, stream="discriminator")], now=1.0)
    g = store.job_window("gan", 2.0, stream="generator")
    d = store.job_window("gan", 2.0, stream="discriminator")
    assert sorted(g.ranks) == [0, 1] and sorted(d.ranks) == [0] and g.stream == "generator"
    assert not g.meta.loss_minimized and g.meta.world_size == 2
    assert d.meta.loss_minimized and store.rank_window("gan", 0, stream="discriminator").meta.loss_minimized


def test_a_silent_job_is_forgotten_with_all_its_streams() -> None:
    store = Store(StoreSettings(job_ttl_seconds=10.0))
    store.apply_steps([step(0, job="gan", stream="generator")], now=1.0)
    store.apply_steps([step(0, job="gan", stream="discriminator")], now=5.0)
    assert store.expire(12.0) == []  # the discriminator spoke at 5 s: the job is alive
    assert store.expire(16.0) == ["gan"] and not list(store)
