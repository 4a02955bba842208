"""healthd.server.gc_policy: what the server keeps is frozen out of young collections; cycles still die."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from healthd.server.app import create_app
from healthd.server.gc_policy import ServingGC
from healthd.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def _garbage_cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_install_freezes_what_exists_and_makes_young_collections_rarer() -> None:
    ServingGC().install()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == 50_000


def test_a_frozen_cycle_waits_for_the_full_collection_then_is_freed() -> None:
    clock = Clock()
    policy = ServingGC(freeze_seconds=0.25, full_collection_seconds=3600.0, clock=clock)
    policy.install()
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    policy.tick()  # the cycle is alive: frozen with everything else
    del a, b
    gc.collect()
    assert ref() is not None, "a frozen object is out of every collection's reach"
    clock.t += 3599.0
    policy.tick()
    assert ref() is not None
    clock.t += 1.0
    policy.tick()  # the hourly full collection unfreezes first
    assert ref() is None
    assert gc.get_freeze_count() > 0, "and freezes again after it"


def test_between_freezes_young_collections_still_free_new_cycles() -> None:
    policy = ServingGC(clock=Clock())
    policy.install()
    ref = _garbage_cycle()  # made and dropped after the last freeze: young, not frozen
    gc.collect(0)
    assert ref() is None


def test_the_server_runs_the_policy_from_its_event_loop() -> None:
    ticks: list[float] = []

    class Counting(ServingGC):
        def tick(self) -> None:
            ticks.append(time.monotonic())
            super().tick()

    app = create_app(Settings(), gc_policy=Counting(freeze_seconds=0.01))
    with TestClient(app) as client:
        assert gc.get_threshold()[0] == 50_000  # installed at start-up
        deadline = time.monotonic() + 10
        while len(ticks) < 3 and time.monotonic() < deadline:
            assert client.get("/healthz").status_code == 200
            time.sleep(0.01)
    assert len(ticks) >= 3
    assert gc.get_freeze_count() > 0


def test_apps_without_a_policy_leave_the_collector_alone() -> None:
    before = gc.get_threshold()
    with TestClient(create_app(Settings())) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
