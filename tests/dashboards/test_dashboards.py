"""dashboards/: the committed JSON is what the code generates; variables, units and metric names are right."""

from __future__ import annotations

import re
from pathlib import Path

from healthd.exposition import catalog as C
from healthd_dashboards import dashboards, expressions, render

JSON_DIR = Path(__file__).resolve().parents[2] / "dashboards" / "json"
NAME = re.compile(r"\b(trainhealth_[a-z0-9_]+|healthd_[a-z0-9_]+)")


def _exposed_names() -> set[str]:
    names = set()
    for m in C.ALL:
        names.add(m.name)
        if m.type is C.MetricType.SUMMARY:
            names |= {m.name + "_sum", m.name + "_count"}
    return names


def test_committed_json_is_up_to_date() -> None:
    models = dashboards()
    assert sorted(p.stem for p in JSON_DIR.glob("*.json")) == sorted(models)
    for uid, model in models.items():
        assert (JSON_DIR / f"{uid}.json").read_text() == render(model), \
            f"dashboards/json/{uid}.json is stale: run `healthd dashboards export dashboards/json`"


def test_every_query_names_a_catalog_metric() -> None:
    known = _exposed_names()
    for model in dashboards().values():
        for title, expr in expressions(model):
            used = set(NAME.findall(expr))
            assert used and used <= known, (model["uid"], title, used - known)


def test_variables_datasource_job_rank_and_units() -> None:
    models = dashboards()
    for uid, model in models.items():
        names = [v["name"] for v in model["templating"]["list"]]
        assert names[:2] == ["datasource", "job"], uid
        if uid != "healthd-layers":
            assert "rank" in names
        for p in model["panels"]:
            for t in p.get("targets", []):
                assert t["datasource"]["uid"] == "${datasource}"
    units = {p["title"]: p.get("fieldConfig", {}).get("defaults", {}).get("unit")
             for m in models.values() for p in m["panels"]}
    assert units["GPU memory"] == "bytes" and units["Step time"] == "s"
    assert units["GPU utilization"] == "percentunit" and units["Update ratio |Δw|/|w|"] == "percentunit"


def test_spikes_are_drawn_from_window_max_not_the_last_value() -> None:
    job = dashboards()["healthd-job"]
    grad = next(p for p in job["panels"] if p["title"] == "Gradient norm")
    assert any(C.WINDOW_MAX["grad_norm"].name in t["expr"] and "max_over_time" in t["expr"]
               for t in grad["targets"])
    assert any(a.get("expr", "").startswith(C.ALERT.name) for a in job["annotations"]["list"])


def test_stream_variable_and_legends_tell_streams_apart() -> None:
    """A GAN's generator and discriminator are two streams of one rank: every dashboard can pick them
    (multi, All = .*, which also matches the unnamed stream's empty label) and per-rank and per-layer
    lines name their stream. GPU panels are per rank: a process samples its GPU once."""
    gpu = {m.name for m in C.ALL if "gpu" in m.labels}
    for uid, model in dashboards().items():
        var = next(v for v in model["templating"]["list"] if v["name"] == "stream")
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*", uid
        assert "$job" in var["query"] and C.STEP.name in var["query"]
        for p in model["panels"]:
            for t in p.get("targets", []):
                expr, legend = t["expr"], t.get("legendFormat", "")
                if set(NAME.findall(expr)) & gpu:
                    assert "$stream" not in expr and "{{stream}}" not in legend, (uid, p["title"])
                    continue
                assert 'stream=~"$stream"' in expr, (uid, p["title"], expr)
                if "{{rank}}" in legend or "{{layer}}" in legend:
                    assert "{{stream}}" in legend, (uid, p["title"], legend)
