"""Interpreter start-up hook for auto-attach: cheap, imports no torch, does nothing unless asked.

What lives here: ``start()``, run by the ``healthd_auto.pth`` line installed with the package (and by
``autostart/sitecustomize.py``, which ``healthd-run`` puts on PYTHONPATH for environments where the
``.pth`` is not installed). With HEALTHD_AUTO unset it returns at once. With HEALTHD_AUTO=1 it waits
for the process to import torch (a one-shot ``sys.meta_path`` finder, the post-import hook that
OpenTelemetry's ``sitecustomize`` and wrapt use) and then lets ``healthd_client.auto`` install its
global hooks. A process that never imports torch (the launcher, torchrun's agent before it imports
torch, pip) only pays for this module. What does not live here: anything that imports torch.

Never harm: an exception here is logged once and the process runs as if healthd were absent.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

logger = logging.getLogger("healthd_client.auto")

_TRUE = frozenset({"1", "true", "yes", "on"})
_started = False


def enabled() -> bool:
    """Whether HEALTHD_AUTO asks for auto-attach in this process (1, true, yes or on)."""
    return os.environ.get("HEALTHD_AUTO", "").strip().lower() in _TRUE


def start() -> None:
    """Arm auto-attach if HEALTHD_AUTO is set: now if torch is already imported, else when it is. Idempotent."""
    global _started
    if _started or not enabled():
        return
    _started = True
    try:
        if "torch" in sys.modules:
            _on_torch_imported()
        else:
            sys.meta_path.insert(0, _TorchImportWatcher())
    except Exception as exc:  # never harm the job
        logger.warning("healthd: auto-attach could not start and is off for this process: %r", exc)


def _on_torch_imported() -> None:
    try:
        from healthd_client import auto

        auto.install()
    except Exception as exc:  # never harm the job
        logger.warning("healthd: auto-attach could not start and is off for this process: %r", exc)


class _TorchImportWatcher:
    """Finds nothing itself: when ``torch`` is looked up, it asks the other finders and makes the found
    loader call ``_on_torch_imported`` once torch's ``__init__`` has run. Removes itself on first use.
    (``sys.meta_path`` takes any object with ``find_spec``; not subclassing ``importlib.abc.MetaPathFinder``
    saves every process ~20 ms of imports.)"""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torch":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        loader: Any = spec.loader if spec is not None else None
        exec_module = getattr(loader, "exec_module", None)
        if loader is None or exec_module is None:
            return spec

        def exec_then_attach(module: ModuleType) -> None:
            exec_module(module)
            _on_torch_imported()

        # On this spec's own loader instance only: importlib.resources and friends keep working.
        loader.exec_module = exec_then_attach
        return spec
