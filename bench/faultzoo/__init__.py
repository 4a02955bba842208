"""The fault zoo: training scenarios with one known mistake each, and healthy controls.

``python -m bench.faultzoo`` runs them all against an in-process healthd and
prints one row per scenario, a summary line (recall, false alarms, median steps
to detect) and writes ``bench/faultzoo/results.json``. See ``scenarios`` for the
scenarios and ``runner`` for how a run is scored.
"""
