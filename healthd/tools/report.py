"""``healthd report --job J``: one self-contained HTML page of a run, from healthd's stored data.

What lives here: fetching a job's series from a running healthd
(``GET /v1/jobs/{job}/series``, see ``healthd.exposition.series``), plotting it with
matplotlib (``Figure`` objects on the Agg canvas, no pyplot global state) and
writing one HTML file with the plots embedded as base64 PNGs, so the page opens
anywhere, offline, without Prometheus or Grafana.

Plots: loss and validation loss; global gradient norm; update ratio per layer;
learning rate; GPU memory and utilisation per rank (when GPU samples exist).
Every alert is drawn as a vertical line at the step it was first seen, labelled
with its rule, and listed below with its evidence and advice. The setup
recorded at attach (model summary, optimizer, world size, versions, git
commit) opens the page.

What it shows is what healthd keeps: the first ``store.initial_steps`` and the
last ``store.window_steps`` steps per rank, not every step of a long run.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import quote

import httpx

from healthd.engine.incidents import by_incident

_SEVERITY_COLOUR = {"critical": "#c0392b", "warning": "#d68910", "info": "#2e6fd8"}
_MAX_LAYER_LINES = 12  # update-ratio lines per plot; the rest are folded away (largest spread kept)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#1d2430}
h1{font-size:1.5em;margin-bottom:.1em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #dde1e6}
.muted{color:#6b7280}table{border-collapse:collapse;width:100%;margin:.4em 0}
th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #e5e7eb;vertical-align:top}
th{background:#f3f4f6}.sev{padding:0 .5em;border-radius:3px;font-weight:600;font-size:.85em}
.critical{background:#fde2e1;color:#9b1c1c}.warning{background:#fef3c7;color:#92400e}.info{background:#e0ecff;color:#1e40af}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:1em}.plots figure{margin:0}
.plots img{width:100%;border:1px solid #e5e7eb}figcaption{font-size:.85em;color:#6b7280}
.evidence{font-size:.85em;color:#4b5563}code{font-size:.9em}
"""


class ReportError(RuntimeError):
    """The report cannot be made (server unreachable, unknown job); the message says why."""


def fetch_series(server: str, job: str, *, timeout_seconds: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
    """GET the job's series from a running healthd at ``server``."""
    url = server.rstrip("/") + "/v1/jobs/" + quote(job, safe="/:@+") + "/series"
    try:
        with httpx.Client(timeout=timeout_seconds, transport=transport) as client:
            r = client.get(url)
    except httpx.HTTPError as e:
        raise ReportError(f"cannot reach healthd at {server}: {e}") from None
    if r.status_code == 404:
        raise ReportError(f"healthd at {server} knows no job named {job!r}")
    if r.status_code != 200:
        raise ReportError(f"GET {url} answered {r.status_code}: {r.text[:200]}")
    data: dict[str, Any] = r.json()
    return data


# ----------------------------------------------------------------------------- plotting


def _finite(v: Any) -> TypeGuard[float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _xy(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if _finite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_axes(title: str, ylabel: str) -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure  # Agg canvas by default; no pyplot, no global state
    except ImportError:
        raise ReportError("healthd report needs matplotlib: pip install 'healthd[report]'") from None

    fig = Figure(figsize=(6.4, 3.4), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _mark_alerts(ax: Any, alerts: Sequence[Mapping[str, Any]]) -> None:
    for a in alerts:
        if a.get("step") is None:
            continue
        colour = _SEVERITY_COLOUR.get(a["severity"], "#555")
        ax.axvline(a["step"], color=colour, linestyle="--", linewidth=1.2, alpha=0.8)
        ax.annotate(a["rule"], xy=(a["step"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7, color=colour)


def _log_if_positive(ax: Any, values: Sequence[float]) -> None:
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 50:
        ax.set_yscale("log")


def _plot(title: str, ylabel: str, lines: Sequence[tuple[str, list[int], list[float]]],
          alerts: Sequence[Mapping[str, Any]], *, style: str = "-") -> str | None:
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return None
    fig, ax = _new_axes(title, ylabel)
    for label, xs, ys in lines:
        ax.plot(xs, ys, style, label=label, linewidth=1.2, markersize=4)
    _log_if_positive(ax, [y for _, _, ys in lines for y in ys])
    _mark_alerts(ax, alerts)
    if len(lines) > 1:
        ax.legend(fontsize=7, loc="best", ncol=2 if len(lines) > 6 else 1)
    return _png(fig)


def _layer_lines(steps: Sequence[Mapping[str, Any]], key: str) -> list[tuple[str, list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for s in steps:
        for name, stats in (s.get("layers") or {}).items():
            v = stats.get(key)
            if _finite(v):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(s["step"])
                ys.append(float(v))
    names = sorted(series, key=lambda n: -max(series[n][1]))[:_MAX_LAYER_LINES]
    return [(n, *series[n]) for n in names]


def build_plots(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for every plot there is data for."""
    ranks: Mapping[str, Mapping[str, Any]] = data.get("ranks", {})
    alerts = data.get("alerts", [])
    first = ranks[min(ranks, key=int)] if ranks else {"steps": [], "evals": [], "gpu": []}
    steps, evals = first["steps"], first["evals"]
    multi = len(ranks) > 1
    plots: list[tuple[str, str | None]] = []

    loss_lines = [(f"loss rank {r}" if multi else "train loss", *_xy(v["steps"], "loss")) for r, v in ranks.items()]
    val = ("val loss", *_xy(evals, "loss"))
    plots.append(("Loss (train per step, validation per eval)", _plot("loss", "loss", [*loss_lines, val], alerts)))
    gn = [(f"rank {r}", *_xy(v["steps"], "grad_norm")) for r, v in ranks.items()]
    plots.append(("Global gradient L2 norm (what the optimizer applied)",
                  _plot("gradient norm", "L2 norm", gn, alerts)))
    ur = _layer_lines(steps, "update_ratio")
    plots.append(("Update ratio ‖Δw‖/‖w‖ per layer (rank 0; about 1e-3 is typical)",
                  _plot("update ratio per layer", "ratio", ur or [("all", *_xy(steps, "update_ratio"))], alerts,
                        style=".-")))
    lr_x, lr_y = [], []
    for s in steps:
        if s.get("lr") and _finite(s["lr"][0]):
            lr_x.append(s["step"])
            lr_y.append(float(s["lr"][0]))
    plots.append(("Learning rate (param group 0)", _plot("learning rate", "lr", [("lr", lr_x, lr_y)], alerts)))

    mem, util = [], []
    for r, v in ranks.items():
        gpu = v.get("gpu", [])
        t0 = gpu[0]["time"] if gpu else 0.0
        for g_idx in sorted({g["gpu"] for g in gpu}):
            rows = [g for g in gpu if g["gpu"] == g_idx]
            label = f"rank {r} gpu {g_idx}"
            xs = [g["time"] - t0 for g in rows]
            mem.append((label, [x for x, g in zip(xs, rows, strict=True) if _finite(g.get("memory_used_bytes"))],
                        [g["memory_used_bytes"] / 2**30 for g in rows if _finite(g.get("memory_used_bytes"))]))
            util.append((label, [x for x, g in zip(xs, rows, strict=True) if _finite(g.get("utilization_gpu_ratio"))],
                         [100 * g["utilization_gpu_ratio"] for g in rows if _finite(g.get("utilization_gpu_ratio"))]))
    for caption, title, ylabel, lines in (("GPU memory used per rank (NVML)", "GPU memory", "GiB", mem),
                                          ("GPU utilisation per rank (NVML)", "GPU utilisation", "%", util)):
        png = None
        if any(xs for _, xs, _ in lines):
            fig, ax = _new_axes(title, ylabel)
            ax.set_xlabel("seconds since first sample")
            for label, xs, ys in lines:
                ax.plot(xs, ys, label=label, linewidth=1.2)
            ax.legend(fontsize=7)
            png = _png(fig)
        plots.append((caption, png))
    return [(c, p) for c, p in plots if p is not None]


# ----------------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _setup_html(data: Mapping[str, Any]) -> str:
    a = data.get("attach")
    if not a:
        return '<p class="muted">The job sent no attach report.</p>'
    rows = [("world size", a["world_size"]), ("global batch size", data.get("global_batch_size") or "unknown"),
            ("host (rank 0)", a.get("hostname") or ""), ("git commit", a.get("git_commit") or "unknown"),
            ("versions", ", ".join(f"{k} {v}" for k, v in a.get("versions", {}).items()))]
    hints = {k: v for k, v in (a.get("hints") or {}).items() if v is not None}
    if hints:
        rows.append(("hints", ", ".join(f"{k}={v}" for k, v in hints.items())))
    opt = a.get("optimizer")
    if opt:
        hp = ", ".join(f"{k}={_fmt(v)}" for k, v in opt.get("hyperparams", {}).items())
        rows.append(("optimizer", f"{opt['name']} ({opt.get('param_groups', 1)} param group(s)): {hp}"))
    out = "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"
    model = a.get("model")
    if model:
        out += (f"<h3>Model: {model['param_count']:,} parameters ({model['trainable_count']:,} trainable)</h3>"
                "<table><tr><th>layer</th><th>type</th><th>parameters</th><th>shapes</th></tr>")
        for layer in model.get("layers", []):
            shapes = ", ".join("×".join(str(d) for d in s) for s in layer.get("shapes", []))
            out += (f"<tr><td><code>{_e(layer['name'])}</code></td><td>{_e(layer['module_type'])}</td>"
                    f"<td>{layer['params']:,}</td><td>{_e(shapes)}</td></tr>")
        out += "</table>"
    for f in a.get("static_findings", []):
        out += f"<p>Found at attach: <b>{_e(f['check'])}</b> {_e(f.get('layer') or '')} {_e(f.get('detail', ''))}</p>"
    return out


def _alerts_html(alerts: Sequence[Mapping[str, Any]]) -> str:
    if not alerts:
        return '<p>No alerts fired for this run.</p>'
    rows = []
    groups = by_incident(alerts, id_of=lambda a: str(a["id"]), incident_of=lambda a: a.get("incident"),
                         started_of=lambda a: float(a["started_at"]))
    for group in groups:
        if len(group) > 1:  # an incident: its likely cause, then the consequences under it
            rows.append(f'<tr class="incident"><td colspan="3"><b>Incident: likely cause {_e(group[0]["rule"])}'
                        f'</b>, {len(group) - 1} consequence(s)</td></tr>')
        rows.extend(_alert_row(a, consequence=a is not group[0]) for a in group)
    return ("<table><tr><th>severity</th><th>what, where, evidence</th><th>advice</th></tr>"
            + "".join(rows) + "</table>")


def _alert_row(a: Mapping[str, Any], *, consequence: bool) -> str:
    where = "job" if a.get("rank") is None else f"rank {a['rank']}"
    if a.get("layer"):
        where += f", layer {a['layer']}"
    steps = a.get("step")
    if a.get("last_step") not in (None, steps):
        steps = f"{steps}–{a['last_step']}"
    evidence = ", ".join(f"{_e(k)}={_e(_fmt(v))}" for k, v in a.get("evidence", {}).items())
    cause = f'<br><span class="muted">caused by {_e(a["caused_by"])}</span>' if consequence and a.get(
        "caused_by") else ""
    return (
        f'<tr class="alert" data-rule="{_e(a["rule"])}">'
        f'<td><span class="sev {_e(a["severity"])}">'
        f'{_e(a["severity"])}</span><br><span class="muted">{_e(a["state"])}</span>{cause}</td>'
        f'<td><b>{_e(a["rule"])}</b> ({_e(where)}, step {_e(steps)})<br>{_e(a["summary"])}'
        f'<div class="evidence">{evidence}</div></td><td>{_e(a["advice"])}</td></tr>'
    )


def render_report(data: Mapping[str, Any], *, generated_at: float | None = None) -> str:
    """The report page for one job's series (``healthd.exposition.series.job_series``'s shape)."""
    job = data["job"]
    ranks = data.get("ranks", {})
    steps_seen = sum(len(v["steps"]) for v in ranks.values())
    last = max((s["step"] for v in ranks.values() for s in v["steps"]), default=None)
    when = dt.datetime.fromtimestamp(generated_at or dt.datetime.now().timestamp(), dt.UTC)
    firing = [a for a in data.get("alerts", []) if a["state"] == "firing"]
    figures = "".join(
        f'<figure><img alt="{_e(c)}" src="data:image/png;base64,{png}"><figcaption>{_e(c)}</figcaption></figure>'
        for c, png in build_plots(data)
    ) or '<p class="muted">No step data stored for this job.</p>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>healthd report · {_e(job)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Training health report: {_e(job)}</h1>"
        f'<p class="muted">{len(ranks)} rank(s) · last step {_e(last)} · {steps_seen} stored step reports · '
        f"{len(data.get('alerts', []))} alert(s), {len(firing)} firing · generated "
        f"{when:%Y-%m-%d %H:%M:%S} UTC by healthd report</p>"
        f"<h2>Alerts</h2>{_alerts_html(data.get('alerts', []))}"
        f'<h2>Curves</h2><p class="muted">Dashed lines: where an alert was first seen.</p>'
        f'<div class="plots">{figures}</div>'
        f"<h2>Setup (recorded at attach)</h2>{_setup_html(data)}</body></html>"
    )


def write_report(server: str, job: str, out: str | Path) -> Path:
    """Fetch, render and write the report; returns the path written."""
    path = Path(out)
    path.write_text(render_report(fetch_series(server, job)), encoding="utf-8")
    return path
