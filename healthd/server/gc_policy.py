"""How a long-lived healthd server process runs CPython's cyclic garbage collector.

healthd keeps about a million small report objects in its windows (2,048 ranks x 128 steps whole),
each freed by reference counting when its window moves on: they hold no reference cycles. CPython's
collector does not know that. It counts *net* allocations, so under healthd's load (as many objects
freed as made) the youngest generation grows to millions of objects between collections, and each
collection then walks all of them to find nothing: pauses of ~1 s every ~10 s, ~6 % of the server's
CPU, measured with ``bench/ingest.py`` (2,048 ranks; every collection in a 60 s run was of the young
generation and none found garbage after start-up).

``ServingGC`` moves everything alive into the collector's permanent generation (``gc.freeze``) every
``freeze_seconds``, so a young collection only ever walks what was made since (milliseconds), and
once every ``full_collection_seconds`` unfreezes and runs one full collection, so a reference cycle
made meanwhile (rare here: an exception kept with its traceback) is still freed, an hour late at
worst. Process-wide state, so it is opt-in: ``healthd serve`` (and the ingest benchmark) pass one to
``create_app``; tests and embedded servers leave the collector alone.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("healthd.gc")


@dataclass
class ServingGC:
    freeze_seconds: float = 0.25
    full_collection_seconds: float = 3600.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._last_full = self.clock()

    def install(self) -> None:
        """Start-up: collect what start-up left behind, freeze the rest (modules, app, rules, restored
        state), and make young collections rarer (a young collection is cheap once frozen, but there
        is nothing for it to find either)."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        self._last_full = self.clock()

    def tick(self) -> None:
        """Called every ``freeze_seconds`` from the server's event loop (``healthd.server.app``)."""
        if self.clock() - self._last_full >= self.full_collection_seconds:
            self._last_full = self.clock()
            t0 = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            log.info("full garbage collection: %d unreachable objects freed in %.3f s", found,
                     time.perf_counter() - t0)
        gc.freeze()
