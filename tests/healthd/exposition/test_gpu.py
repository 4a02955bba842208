"""healthd.exposition.gpu: one series per device of a (job, rank), under the stream that samples it now."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from healthd.exposition import catalog as C
from healthd.server.pipeline import Healthd, build
from healthd.settings import Settings
from healthd.wire.schema import GpuReport

GIB = 2**30


def _sample(stream: str | None, t: float, used: float, gpu: int = 0, uuid: str = "GPU-a") -> GpuReport:
    return GpuReport(job="gan", rank=0, stream=stream, time=t, gpu=gpu, uuid=uuid, hostname="node-1",
                     memory_used_bytes=int(used * GIB), memory_total_bytes=80 * GIB, xid_events=[])


def _used(hd: Healthd) -> dict[tuple[str, str], float]:
    text = generate_latest(hd.registry).decode()
    return {(s.labels["stream"], s.labels["UUID"]): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == C.GPU_MEMORY_USED.family_name}


def test_a_device_handed_to_another_stream_is_one_series_under_the_new_stream() -> None:
    hd = build(Settings())
    for i in range(3):  # the generator's monitor samples, then closes and hands the sampler over
        hd.store.apply(_sample("generator", 1000.0 + i, 10 + i), now=1000.0 + i)
    assert _used(hd) == {("generator", "GPU-a"): 12 * GIB}
    hd.store.apply(_sample("discriminator", 1003.0, 13), now=1003.0)
    assert _used(hd) == {("discriminator", "GPU-a"): 13 * GIB}  # moved, not copied


def test_streams_sampling_different_devices_each_keep_theirs() -> None:
    hd = build(Settings())
    hd.store.apply(_sample("generator", 1000.0, 10), now=1000.0)
    hd.store.apply(_sample("discriminator", 1001.0, 20, gpu=1, uuid="GPU-b"), now=1001.0)
    hd.store.apply(_sample(None, 1002.0, 30, gpu=2, uuid="GPU-c"), now=1002.0)
    assert _used(hd) == {("generator", "GPU-a"): 10 * GIB, ("discriminator", "GPU-b"): 20 * GIB,
                         ("", "GPU-c"): 30 * GIB}
