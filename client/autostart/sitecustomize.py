"""``healthd-run`` puts this directory first on PYTHONPATH: Python imports this ``sitecustomize`` at
start-up, it arms auto-attach (``healthd_client.bootstrap``), then runs the ``sitecustomize`` it
shadows, if there is one (Debian's, a site's own), so that one still runs."""

import importlib.machinery
import importlib.util
import os
import sys


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


try:
    from healthd_client import bootstrap

    bootstrap.start()
finally:
    _chain()
