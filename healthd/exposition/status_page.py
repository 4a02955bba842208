"""``GET /``: a small server-rendered status page, for when there is no Grafana at hand.

What lives here: one function that renders the jobs healthd knows, their ranks
(last step, last seen, closed), the job's setup at attach, and the active
(pending and firing) alerts with their evidence and advice, grouped by incident
(``healthd.engine.incidents``: the likely cause first, its consequences under it), as one HTML page
with inline CSS. No JavaScript, no build step; it refreshes itself every
``refresh_seconds``. What does not: the data (``healthd.state.store``,
``healthd.engine.alerts``), the JSON API (``healthd.server.app``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote

from healthd.engine.incidents import by_incident

if TYPE_CHECKING:
    from healthd.engine.alerts import Alert, Engine
    from healthd.state.store import JobState, Store

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#1d2430;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .4em}
.muted{color:#6b7280}.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:.8em 1em;margin:.8em 0}
table{border-collapse:collapse;width:100%;margin:.3em 0}th,td{text-align:left;padding:.3em .6em;
border-bottom:1px solid #e5e7eb;vertical-align:top}th{font-weight:600;color:#374151;background:#f3f4f6}
.sev{display:inline-block;padding:0 .5em;border-radius:3px;font-weight:600;font-size:.85em}
.critical{background:#fde2e1;color:#9b1c1c}.warning{background:#fef3c7;color:#92400e}.info{background:#e0ecff;color:#1e40af}
.state{font-size:.85em;color:#374151}.ok{color:#047857;font-weight:600}code{font-size:.9em}
.evidence{font-size:.85em;color:#4b5563}.advice{font-size:.9em}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "never"
    seconds = max(0.0, now - then)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _evidence(evidence: Mapping[str, object]) -> str:
    return ", ".join(f"{_e(k)}={_e(_fmt(v))}" for k, v in evidence.items())


def _alert_rows(alerts: list[Alert]) -> str:
    rows = []
    for group in by_incident(alerts, id_of=lambda a: a.id, incident_of=lambda a: a.incident,
                             started_of=lambda a: a.started_at):
        if len(group) > 1:  # an incident: its likely cause, then the consequences under it
            rows.append(f'<tr class="incident" data-incident="{_e(group[0].id)}"><td colspan="5"><b>Incident: '
                        f"likely cause {_e(group[0].rule)}</b>, {len(group) - 1} consequence(s)</td></tr>")
        rows.extend(_alert_row(a, consequence=a is not group[0]) for a in group)
    return "".join(rows)


def _alert_row(a: Alert, *, consequence: bool) -> str:
    where = f"rank {a.rank}" if a.rank is not None else "job"
    if a.layer:
        where += f" · {_e(a.layer)}"
    steps = f"{a.step}" if a.last_step in (None, a.step) else f"{a.step}–{a.last_step}"
    cause = f'<br><span class="muted">caused by {_e(a.caused_by)}</span>' if consequence and a.caused_by else ""
    return (
        f'<tr class="alert" data-rule="{_e(a.rule)}" data-state="{_e(a.state.value)}">'
        f'<td><span class="sev {_e(a.severity.value)}">{_e(a.severity.value)}</span> '
        f'<span class="state">{_e(a.state.value)}</span>{cause}</td>'
        f"<td><b>{_e(a.rule)}</b><br>{_e(a.summary)}"
        f'<div class="evidence">{_evidence(a.evidence)}</div></td>'
        f"<td>{where}</td><td>{_e(steps)}</td>"
        f'<td class="advice">{_e(a.advice)}</td></tr>'
    )


def _setup(job: JobState) -> str:
    a = job.attach
    if a is None:
        return '<p class="muted">no attach report yet</p>'
    parts = [f"world size {a.world_size}"]
    if job.global_batch_size is not None:
        parts.append(f"global batch {job.global_batch_size}")
    if a.model is not None:
        parts.append(f"{a.model.param_count:,} parameters in {len(a.model.layers)} layers")
    if a.optimizer is not None:
        hp = ", ".join(f"{_e(k)}={_e(_fmt(v))}" for k, v in list(a.optimizer.hyperparams.items())[:6])
        parts.append(f"{_e(a.optimizer.name)}({hp})")
    if a.git_commit:
        parts.append(f"git <code>{_e(a.git_commit[:12])}</code>")
    versions = ", ".join(f"{_e(k)} {_e(v)}" for k, v in a.versions.items())
    return f'<p>{" · ".join(parts)}</p><p class="muted">{versions}</p>'


def _degraded(job: JobState) -> str:
    """One line per disabled quantity: which ranks no longer measure it, and why (first rank's reason)."""
    ranks: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for r in sorted(job.ranks):
        hb = job.ranks[r].last_heartbeat
        for d in hb.disabled_quantities if hb is not None else ():
            ranks.setdefault(d.name, []).append(r)
            reasons.setdefault(d.name, d.reason)
    return "".join(
        f'<p class="degraded">monitoring degraded: <code>{_e(name)}</code> not measured on rank(s) '
        f"{_e(', '.join(map(str, rs)))}: {_e(reasons[name])}</p>" for name, rs in sorted(ranks.items()))


def _job_card(job: JobState, engine: Engine, now: float) -> str:
    rank_rows = []
    for r in sorted(job.ranks):
        st = job.ranks[r]
        last = st.last_step.step if st.last_step else "–"
        state = "closed" if st.closed else "running"
        rank_rows.append(
            f'<tr class="rank"><td>{r}</td><td>{_e(st.attach.hostname if st.attach else "")}</td>'
            f"<td>{last}</td><td>{st.steps_total}</td><td>{_ago(now, st.last_seen)}</td><td>{state}</td></tr>"
        )
    active = engine.alerts(job.name, include_resolved=False)
    alerts = (
        "<table><tr><th>severity</th><th>alert</th><th>where</th><th>steps</th><th>advice</th></tr>"
        f"{_alert_rows(active)}</table>"
        if active else '<p class="ok">no active alerts</p>'
    )
    link = "/v1/jobs/" + quote(job.name, safe="/:@+")
    return (
        f'<div class="card job" id="job-{_e(job.name)}"><h2>{_e(job.name)} '
        f'<span class="muted">· {len(job.ranks)} rank(s) · last seen {_ago(now, job.last_seen)} · '
        f'<a href="{_e(link)}">json</a></span></h2>{_setup(job)}{_degraded(job)}'
        "<table><tr><th>rank</th><th>host</th><th>last step</th><th>steps</th><th>last report</th><th>state</th></tr>"
        f'{"".join(rank_rows)}</table><h3>Active alerts ({len(active)})</h3>{alerts}</div>'
    )


def render_status_page(store: Store, engine: Engine, now: float, *, refresh_seconds: int = 10) -> str:
    """The whole status page as an HTML string."""
    jobs = sorted(store, key=lambda j: j.name)
    firing = sum(1 for a in engine.firing() if a.job in store.jobs)
    body = "".join(_job_card(j, engine, now) for j in jobs) or '<p class="muted">no jobs have reported yet</p>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">'
        f"<title>healthd · {len(jobs)} job(s), {firing} firing</title><style>{_CSS}</style></head><body>"
        f'<h1>healthd</h1><p class="muted">{len(jobs)} job(s) · {firing} alert(s) firing · '
        '<a href="/metrics">/metrics</a> · <a href="/v1/alerts">/v1/alerts</a> · '
        f"refreshes every {int(refresh_seconds)} s</p>{body}</body></html>"
    )
