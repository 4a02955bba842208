"""healthd.exposition.collector: a scrape reads the store and changes nothing; collected families encode as the
registry does."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from healthd.exposition import catalog as C
from healthd.exposition.collector import Collected
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.wire.schema import StepReport


def _healthd(now: list[float]) -> Healthd:
    hd = build(Settings.from_mapping({"store": {"job_ttl_seconds": 60}}), clock=lambda: now[0])
    for rank in range(3):
        for i in range(4):
            hd.store.apply(StepReport(job="j", rank=rank, time=now[0], step=i, loss=1.0 + i, grad_norm=1.0, lr=[0.1],
                                      layers={}), now=now[0])
    return hd


def test_a_job_past_its_ttl_is_still_scraped_until_the_tick_expires_it() -> None:
    now = [1000.0]
    hd = _healthd(now)
    now[0] += 61
    names = {f.name for f in hd.collector.collect() if f.samples}
    assert C.LOSS.name in names and set(hd.store.jobs) == {"j"}
    hd.tick()
    assert not hd.store.jobs and not any(f.samples for f in hd.collector.collect() if f.name == C.LOSS.name)


def test_collected_families_encode_as_the_registry_does() -> None:
    hd = _healthd([1000.0])
    families = [f for f in hd.collector.collect_in_slices() if f is not None]
    assert generate_latest(Collected(families)) == generate_latest(hd.registry)
    assert openmetrics_latest(Collected(families)) == openmetrics_latest(hd.registry)
