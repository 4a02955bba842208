"""healthd.exposition.collector's text exposition: byte for byte what prometheus_client's generate_latest writes."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)

from healthd.exposition import catalog as C
from healthd.exposition.collector import _One, exposition_text
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.wire.schema import StepReport

_VALUES = [0.0, -0.0, 1.0, 2.5, -3.0, 1e-300, 1e300, 123456789.0, 1234567.5, math.nan, math.inf, -math.inf, 7, 2**60]
_LABELS = ["plain", "", 'quo"te', "back\\slash", "new\nline", "ünïcode", "a,b=c}", "\\n"]


def _families() -> list[Metric]:
    gauge = GaugeMetricFamily("trainhealth_loss", 'Loss "as\\is"\nsecond line', labels=["job", "rank"])
    for i, v in enumerate(_VALUES):
        gauge.add_metric([_LABELS[i % len(_LABELS)], str(i)], v)
    bare = GaugeMetricFamily("healthd_up", "No labels.", value=1)
    counter = CounterMetricFamily("trainhealth_steps", "Steps.", labels=["job", "rank"])
    for i in range(5):
        counter.add_metric(["j", str(i)], i * 10)
    created = CounterMetricFamily("healthd_x", "With a created time.", labels=["a"])
    created.add_metric(["1"], 3, created=1700000000.0)
    summary = SummaryMetricFamily("trainhealth_loss_per_step", "Per step.", labels=["job", "rank"])
    summary.add_metric(["j", "0"], count_value=3, sum_value=1.5)
    histogram = HistogramMetricFamily("healthd_h", "H.", labels=["b"])
    histogram.add_metric(["x"], buckets=[("0.5", 1), ("+Inf", 3)], sum_value=2.0)
    stamped = GaugeMetricFamily("healthd_t", "Stamped.", labels=["a"])
    stamped.add_metric(["1"], 2.0, timestamp=1700000000.5)
    odd_label = GaugeMetricFamily("healthd_o", "Odd label name.", labels=["a.b"])
    odd_label.add_metric(["1"], 1.0)
    info = InfoMetricFamily("healthd_build", "Build.", value={"version": "1"})
    stateset = StateSetMetricFamily("healthd_s", "States.", value={"a": True, "b": False})
    gaugehistogram = GaugeHistogramMetricFamily("healthd_gh", "GH.", buckets=[("+Inf", 1)], gsum_value=1.0)
    unknown = UnknownMetricFamily("healthd_u", "Unknown.", value=1.0)
    return [gauge, bare, counter, created, summary, histogram, stamped, odd_label, info, stateset, gaugehistogram,
            unknown]


@pytest.mark.parametrize("family", _families(), ids=lambda f: f.name)
def test_exposition_text_is_generate_latest_byte_for_byte(family: Metric) -> None:
    assert exposition_text(family) == generate_latest(_One(family))  # type: ignore[arg-type]


def test_families_sharing_label_text_are_each_still_written_as_generate_latest_writes_them() -> None:
    families = _families()
    for family in families:  # the same label sets again, given in another key order
        if family.type == "gauge" and family.samples and len(family.samples[0].labels) > 1:
            twin = GaugeMetricFamily(family.name + "_twin", family.documentation, labels=["rank", "job"])
            for s in family.samples:
                twin.add_metric([s.labels["rank"], s.labels["job"]], s.value)
            families.append(twin)
            break
    shared: dict[tuple[tuple[str, str], ...], str] = {}
    assert b"".join(exposition_text(f, shared) for f in families) == b"".join(
        generate_latest(_One(f)) for f in families)  # type: ignore[arg-type]
    assert shared  # the label text was shared


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
