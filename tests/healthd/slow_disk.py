"""An ``AlertDb`` on a disk that does not answer until the test says so."""

from __future__ import annotations

import threading
from pathlib import Path

from healthd.engine.persistence import AlertDb, Row


class SlowDisk(AlertDb):
    """Every transaction of the writer thread waits for ``release``; ``entered`` says one is waiting."""

    def __init__(self, path: Path, **kw: int) -> None:
        super().__init__(path, **kw)
        self.entered = threading.Event()
        self.release = threading.Event()

    def write_batch(self, rows: list[Row], prune: list[str]) -> None:
        self.entered.set()
        if not self.release.wait(timeout=60):  # a failed test must not hang the writer forever
            raise TimeoutError("the test never released the disk")
        super().write_batch(rows, prune)
