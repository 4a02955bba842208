"""healthd's Grafana dashboards as code (grafana-foundation-sdk 11.6), named through healthd.exposition.catalog.

Three dashboards, each with the variables datasource, job, rank (not on layers) and stream:

- ``healthd-job``: one job at a glance: loss and validation loss, gradient norm
  and update ratio (window max, so a spike between two scrapes is drawn, plus
  the per-step mean), learning rate, non-finite counts, noise scale and global
  batch, progress, the active-alerts table, and alerts as annotations.
- ``healthd-ranks``: per rank: step time and straggler score, steps per second
  and seconds since the last report (stalls), GPU memory, utilization and
  temperature.
- ``healthd-layers``: per layer: gradient norm and update ratio as top-k lines
  and a heatmap.

Every trainhealth_* family carries ``stream`` (a named stream of a rank, ``attach(stream="generator")``;
empty for the unnamed one). Selectors filter on ``$stream`` (its "All" is ``.*``, which matches the empty
stream too), aggregations keep it, and per-rank and per-layer legends show ``{{stream}}``: a GAN's
generator and discriminator are two lines, never one sawtooth.

``python -m healthd_dashboards`` or ``healthd dashboards export DIR`` writes the
JSON; ``dashboards/json/`` holds the committed copy, checked by a test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from healthd.exposition import catalog as C

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB_SEL = 'job=~"$job", stream=~"$stream"'
RANK_SEL = 'job=~"$job", rank=~"$rank", stream=~"$stream"'
# A process samples its GPU once, under its first monitor's stream: GPU panels are per rank, not per stream.
GPU_SEL = 'job=~"$job", rank=~"$rank"'
TAGS = ["healthd", "training"]
RATE = "$__rate_interval"


def _q(expr: str, legend: str = "", ref: str = "A", fmt: PromQueryFormat | None = None,
       instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        q = q.legend_format(legend)
    if fmt is not None:
        q = q.format(fmt)
    if instant:
        q = q.instant()
    return q


def _ts(title: str, unit: str, *queries: prometheus.Dataquery, description: str = "", w: int = 12,
        log_scale: bool = False) -> timeseries.Panel:
    p = timeseries.Panel().title(title).unit(unit).datasource(DS).span(w).height(8).targets(list(queries))
    if description:
        p = p.description(description)
    if log_scale:
        from grafana_foundation_sdk.builders.common import ScaleDistributionConfig
        from grafana_foundation_sdk.models.common import ScaleDistribution

        p = p.scale_distribution(ScaleDistributionConfig().type(ScaleDistribution.LOG).log(10))
    return p


def _mean(per_step: C.Metric, sel: str, by: str = "rank, stream") -> str:
    return (f"sum by ({by}) (rate({per_step.name}_sum{{{sel}}}[{RATE}])) / "
            f"sum by ({by}) (rate({per_step.name}_count{{{sel}}}[{RATE}]))")


def _variables(d: db.Dashboard, with_rank: bool = True) -> db.Dashboard:
    d = d.with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    d = d.with_variable(
        db.QueryVariable("job").label("Job").datasource(DS)
        .query(f"label_values({C.STEP.name}, job)").refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )
    if with_rank:
        d = d.with_variable(
            db.QueryVariable("rank").label("Rank").datasource(DS)
            .query(f'label_values({C.STEP.name}{{job=~"$job"}}, rank)')
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.NUMERICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
        )
    # A stream's series exist only once a monitor named it; the unnamed stream has no value to list,
    # so "All" (.*, which matches the empty label) is the default and shows it.
    d = d.with_variable(
        db.QueryVariable("stream").label("Stream").datasource(DS)
        .query(f'label_values({C.STEP.name}{{job=~"$job"}}, stream)')
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )
    return d


def _alert_annotations(d: db.Dashboard) -> db.Dashboard:
    return d.annotation(
        db.AnnotationQuery().name("healthd alerts").datasource(DS).enable(True).icon_color("red")
        .expr(f'{C.ALERT.name}{{{JOB_SEL}}} > 0')
    )


def _base(uid: str, title: str, description: str) -> db.Dashboard:
    return (db.Dashboard(title).uid(uid).description(description).tags(TAGS).refresh("30s").time("now-6h", "now")
            .timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR).editable())


def job_overview() -> db.Dashboard:
    d = _variables(_base("healthd-job", "healthd / Job overview",
                         "One training job: losses, gradients, updates, learning rate, non-finite values, "
                         "noise scale and the alerts healthd raised."))
    d = _alert_annotations(d)
    wmax, wmin, per = C.WINDOW_MAX, C.WINDOW_MIN, C.PER_STEP
    d = d.with_panel(
        table.Panel().title("Active alerts").datasource(DS).span(24).height(6)
        .description("Alerts healthd is firing now (trainhealth_alert). Evidence and advice: healthd's "
                     "/v1/alerts, or the Alertmanager notification.")
        .with_target(_q(f'{C.ALERT.name}{{{JOB_SEL}}} == 1', fmt=PromQueryFormat.TABLE, instant=True))
    )
    d = d.with_panel(
        stat.Panel().title("Step").datasource(DS).span(6).height(4).unit("none")
        .with_target(_q(f"max by (job, stream) ({C.STEP.name}{{{JOB_SEL}}})", "{{job}} {{stream}}"))
    )
    d = d.with_panel(
        stat.Panel().title("Steps per second").datasource(DS).span(6).height(4).unit("none")
        .with_target(_q(f"min by (job, stream) (rate({C.STEPS_TOTAL.name}{{{JOB_SEL}}}[{RATE}]))",
                        "{{job}} {{stream}}"))
    )
    d = d.with_panel(
        stat.Panel().title("Global batch (examples)").datasource(DS).span(6).height(4).unit("none")
        .with_target(_q(f"{C.GLOBAL_BATCH_SIZE.name}{{{JOB_SEL}}}", "{{job}} {{stream}}"))
    )
    d = d.with_panel(
        stat.Panel().title("Gradient noise scale (examples)").datasource(DS).span(6).height(4).unit("none")
        .description("B_simple (McCandlish et al. 2018): batch sizes well below it waste little; far above "
                     "it, extra examples per step buy little. DDP jobs only.")
        .with_target(_q(f"{C.GRADIENT_NOISE_SCALE.name}{{{JOB_SEL}}}", "{{job}} {{stream}}"))
    )
    d = d.with_panel(_ts(
        "Loss", "none",
        _q(f"{C.LOSS.name}{{{RANK_SEL}}}", "last rank {{rank}} {{stream}}", "A"),
        _q(_mean(per["loss"], RANK_SEL), "mean/step rank {{rank}} {{stream}}", "B"),
        _q(f"{C.EVAL_LOSS.name}{{{RANK_SEL}}}", "validation rank {{rank}} {{stream}}", "C"),
        description="Last value at each scrape, the mean per step between scrapes (from _per_step sums), "
                    "and the validation loss at the last monitor.eval().",
    ))
    d = d.with_panel(_ts(
        "Gradient norm", "none",
        _q(f"max_over_time({wmax['grad_norm'].name}{{{RANK_SEL}}}[$__interval])",
           "max rank {{rank}} {{stream}}", "A"),
        _q(_mean(per["grad_norm"], RANK_SEL), "mean/step rank {{rank}} {{stream}}", "B"),
        description="Max over the exporter window: a spike between two scrapes is still drawn.",
        log_scale=True,
    ))
    d = d.with_panel(_ts(
        "Update ratio |Δw|/|w|", "percentunit",
        _q(f"max_over_time({wmax['update_ratio'].name}{{{RANK_SEL}}}[$__interval])",
           "max rank {{rank}} {{stream}}", "A"),
        _q(f"min_over_time({wmin['update_ratio'].name}{{{RANK_SEL}}}[$__interval])",
           "min rank {{rank}} {{stream}}", "B"),
        description="Around 1e-3 is healthy for most optimizers; far above: learning rate too high, "
                    "far below: too low.",
        log_scale=True,
    ))
    d = d.with_panel(_ts(
        "Learning rate", "none",
        _q(f"{C.LEARNING_RATE.name}{{{RANK_SEL}}}", "rank {{rank}} {{stream}} group {{param_group}}"),
    ))
    d = d.with_panel(_ts(
        "Non-finite tensors", "none",
        _q(f"sum by (kind, stream) (increase({C.NONFINITE_TOTAL.name}{{{RANK_SEL}}}[{RATE}]))", "{{stream}} {{kind}}"),
        description="Tensors holding NaN/Inf, by kind (loss, grads, params), per rate interval.",
    ))
    d = d.with_panel(_ts(
        "Validation accuracy", "percentunit",
        _q(f"{C.EVAL_ACCURACY.name}{{{RANK_SEL}}}", "rank {{rank}} {{stream}}"),
    ))
    return d


def ranks() -> db.Dashboard:
    d = _variables(_base("healthd-ranks", "healthd / Ranks",
                         "Per-rank view of a distributed job: step time, stragglers, stalls and GPUs."))
    d = _alert_annotations(d)
    per = C.PER_STEP["step_seconds"]
    mean_rank = _mean(per, RANK_SEL, by="job, rank, stream")
    mean_job = _mean(per, JOB_SEL, by="job, rank, stream")
    d = d.with_panel(_ts(
        "Step time", "s",
        _q(f"max_over_time({C.WINDOW_MAX['step_seconds'].name}{{{RANK_SEL}}}[$__interval])",
           "max rank {{rank}} {{stream}}", "A"),
        _q(mean_rank, "mean rank {{rank}} {{stream}}", "B"),
    ))
    d = d.with_panel(_ts(
        "Straggler score", "none",
        _q(f"({mean_rank}) / on (job, stream) group_left () min by (job, stream) ({mean_job})",
           "rank {{rank}} {{stream}}"),
        description="Mean step time of the rank / the fastest rank's. 1 is the fastest; StragglerRank fires "
                    "well above it.",
    ))
    d = d.with_panel(_ts(
        "Steps per second", "none",
        _q(f"rate({C.STEPS_TOTAL.name}{{{RANK_SEL}}}[{RATE}])", "rank {{rank}} {{stream}}"),
        description="Zero means the rank stalled (RankStalled / TrainingStalled alerts).",
    ))
    d = d.with_panel(_ts(
        "Seconds since last report", "s",
        _q(f"time() - {C.LAST_REPORT_TIMESTAMP.name}{{{RANK_SEL}}}", "rank {{rank}} {{stream}}"),
    ))
    d = d.with_panel(_ts(
        "GPU memory", "bytes",
        _q(f"{C.GPU_MEMORY_USED.name}{{{GPU_SEL}}}", "used rank {{rank}}", "A"),
        _q(f"{C.GPU_TORCH_ALLOCATED.name}{{{GPU_SEL}}}", "torch allocated rank {{rank}}", "B"),
        _q(f"{C.GPU_MEMORY_TOTAL.name}{{{GPU_SEL}}}", "total rank {{rank}}", "C"),
    ))
    d = d.with_panel(_ts(
        "GPU utilization", "percentunit",
        _q(f"{C.GPU_UTILIZATION.name}{{{GPU_SEL}}}", "rank {{rank}}"),
    ))
    d = d.with_panel(_ts(
        "GPU temperature", "celsius",
        _q(f"{C.GPU_TEMPERATURE.name}{{{GPU_SEL}}}", "rank {{rank}}"),
    ))
    return d


def layers() -> db.Dashboard:
    d = _variables(_base("healthd-layers", "healthd / Layers",
                         "Per-layer gradient norm and update ratio (reported by one rank)."), with_rank=False)
    d = _alert_annotations(d)
    d = d.with_variable(
        db.CustomVariable("topk").label("Top k").values("5,10,20,50").current(
            dm.VariableOption(selected=True, text="10", value="10"))
    )
    for metric, unit in ((C.LAYER_GRAD_NORM, "none"), (C.LAYER_UPDATE_RATIO, "percentunit")):
        title = "gradient norm" if metric is C.LAYER_GRAD_NORM else "update ratio"
        d = d.with_panel(_ts(f"Top $topk layers by {title}", unit,
                             _q(f"topk($topk, {metric.name}{{{JOB_SEL}}})", "{{stream}} {{layer}}"), log_scale=True))
        d = d.with_panel(
            heatmap.Panel().title(f"Layer {title} (heatmap)").datasource(DS).span(12).height(10).unit(unit)
            .calculate(False)
            .with_target(_q(f"{metric.name}{{{JOB_SEL}}}", "{{stream}} {{layer}}", fmt=PromQueryFormat.HEATMAP))
        )
    return d


def dashboards() -> dict[str, dict[str, Any]]:
    """uid -> dashboard JSON model."""
    out: dict[str, dict[str, Any]] = {}
    for builder in (job_overview(), ranks(), layers()):
        model = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
        out[model["uid"]] = model
    return out


def render(model: dict[str, Any]) -> str:
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def export(directory: str | Path) -> list[Path]:
    """Write ``<uid>.json`` for each dashboard into ``directory``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    written = []
    for uid, model in dashboards().items():
        f = path / f"{uid}.json"
        f.write_text(render(model))
        written.append(f)
    return written


def configmap(models: dict[str, dict[str, Any]] | None = None) -> str:
    """A ConfigMap of the dashboards labelled for Grafana's sidecar (kube-prometheus-stack's default label)."""
    import yaml

    models = models or dashboards()
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "healthd-dashboards", "labels": {"grafana_dashboard": "1"},
                     "annotations": {"grafana_folder": "healthd"}},
        "data": {f"{uid}.json": render(m) for uid, m in models.items()},
    }
    return ("# Generated by `python -m healthd_dashboards` from dashboards/build.py: do not edit.\n"
            + yaml.safe_dump(cm, sort_keys=False, width=120))


def expressions(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel and annotation of a dashboard model."""
    out: list[tuple[str, str]] = []
    panels = list(model.get("panels") or [])
    while panels:
        p = panels.pop(0)
        panels.extend(p.get("panels") or [])
        for t in p.get("targets") or []:
            if t.get("expr"):
                out.append((p.get("title", ""), t["expr"]))
    for a in (model.get("annotations") or {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a.get('name')}", a["expr"]))
    return out
