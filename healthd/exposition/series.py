"""``GET /v1/jobs/{job}/series``: the stored windows of one job, for ``healthd report`` and notebooks.

What lives here: turning a job's in-memory state (``healthd.state.store``) and its
alerts into one JSON-able dict. What does not: storage (the store keeps bounded
windows: the first ``store.initial_steps`` and the last ``store.window_steps``
steps per rank, the newest ``store.detail_steps`` of them whole and the older ones
as their scalar fields only (step, loss, grad_norm, lr, ...), the last ``evals_kept`` evals and ``gpu_samples_kept`` GPU
samples), rendering (``healthd.tools.report``).

Shape::

    {"job": J, "world_size": N, "global_batch_size": B | null, "attach": AttachReport | null,
     "ranks": {"0": {"steps": [StepReport...], "evals": [EvalReport...], "gpu": [GpuReport...],
                     "steps_total": int, "closed": bool}},
     "alerts": [AlertOut...]}

Steps are sorted by step and de-duplicated (the initial steps and the window
overlap in short runs). NaN/Inf stay data (JSON literals, as on the wire).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from healthd.wire.records import dump

if TYPE_CHECKING:
    from healthd.engine.alerts import Engine
    from healthd.state.store import RankState, Store

SERIES_SCHEMA_VERSION = 1


def _rank_series(job: str, st: RankState) -> dict[str, Any]:
    # Older steps of the window survive as scalar columns only (store.detail_steps): they come out
    # as light step dicts ({"step", "loss", "grad_norm", ...}), the whole reports override them.
    by_step: dict[int, dict[str, Any]] = {}
    cols = st.columns
    for i, k in enumerate(cols.get("step", ())):
        if k is None:
            continue
        light: dict[str, Any] = {"kind": "step", "job": job, "rank": st.rank, "step": int(k)}
        for name, col in cols.items():
            if name != "step" and col[i] is not None:
                light[name] = [col[i]] if name == "lr" else col[i]
        by_step[int(k)] = light
    by_step.update({s.step: dump(s) for s in (*st.initial_steps, *st.steps)})
    return {
        "steps": [by_step[k] for k in sorted(by_step)],
        "evals": [e.model_dump(mode="json") for e in st.evals],
        "gpu": [g.model_dump(mode="json") for g in st.gpu],
        "steps_total": st.steps_total,
        "closed": st.closed,
    }


def job_series(store: Store, engine: Engine, name: str) -> dict[str, Any] | None:
    """Everything stored about job ``name`` (None when healthd does not know it)."""
    job = store.jobs.get(name)
    if job is None:
        return None
    return {
        "schema_version": SERIES_SCHEMA_VERSION,
        "job": name,
        "world_size": job.meta.world_size,
        "global_batch_size": job.global_batch_size,
        "attach": job.attach.model_dump(mode="json") if job.attach else None,
        "ranks": {str(r): _rank_series(name, job.ranks[r]) for r in sorted(job.ranks)},
        "alerts": [a.out().model_dump(mode="json") for a in engine.alerts(name)],
    }
