"""The one list of metrics healthd exports.

Exporter, rules files, dashboards and tests name metrics through this module,
never through loose strings. Names follow Prometheus' naming guide: base units
(seconds, bytes), ratios in 0..1 end in ``_ratio``, counters end in ``_total``.

Label conventions (bounded by construction):
- ``job``: the training job (healthd's own scrape job must use
  ``honor_labels: true``, as with the Pushgateway, so this label survives);
- ``rank``: the process rank within the job (0..world_size-1);
- ``stream``: the named stream of a rank (``attach(stream="generator")``: one of several monitors in
  one process, at most ``limits.max_streams_per_job`` per job), empty for the job's unnamed stream
  (Prometheus' convention for an absent label, so a job without streams keeps its series);
- ``layer``: a parameter group of the model, capped by the client
  (``max_layers``) with the rest folded into ``other``;
- a step number is never a label: it is the value of ``trainhealth_step``.

What lives here: names, types, help, units, labels. What does not: how values
are computed (exporter.py) or when alerts fire (rules/).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

TRAIN_PREFIX = "trainhealth_"
SELF_PREFIX = "healthd_"


class MetricType(str, enum.Enum):
    GAUGE = "gauge"
    COUNTER = "counter"
    SUMMARY = "summary"
    INFO = "info"


@dataclass(frozen=True)
class Metric:
    """One exported metric family.

    ``name`` is the full exposed name; for counters it ends in ``_total``.
    ``unit`` is the Prometheus base unit the name ends in ("" for none).
    """

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...]
    unit: str = ""

    def __post_init__(self) -> None:
        if self.type is MetricType.COUNTER and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")
        if self.unit and not (self.name.endswith("_" + self.unit) or f"_{self.unit}_" in self.name):
            raise ValueError(f"metric {self.name!r} must carry its unit {self.unit!r} in its name")

    @property
    def family_name(self) -> str:
        """Name handed to prometheus_client, which appends ``_total`` itself."""
        return self.name[: -len("_total")] if self.type is MetricType.COUNTER else self.name


JOB_RANK = ("job", "rank", "stream")
JOB_LAYER = ("job", "layer", "stream")


def _g(name: str, help: str, labels: tuple[str, ...] = JOB_RANK, unit: str = "") -> Metric:
    return Metric(TRAIN_PREFIX + name, MetricType.GAUGE, help, labels, unit)


def _c(name: str, help: str, labels: tuple[str, ...] = JOB_RANK, unit: str = "") -> Metric:
    return Metric(TRAIN_PREFIX + name, MetricType.COUNTER, help, labels, unit)


# ----------------------------------------------------------------- per-rank step signals
STEP = _g("step", "Last optimizer step completed by the rank (progress; the step is data, never a label).")
LOSS = _g("loss", "Training loss at the rank's last step.")
GRAD_NORM = _g("grad_norm", "Global L2 norm of the gradients the optimizer saw at the last step.")
GRAD_NORM_LOCAL = _g("grad_norm_local", "This rank's gradient L2 norm before all-reduce (DDP).")
UPDATE_RATIO = _g(
    "update_ratio", "Update-to-weight ratio ||w_t - w_{t-1}|| / ||w_{t-1}|| at the last step.", unit="ratio"
)
LEARNING_RATE = _g("learning_rate", "Learning rate per optimizer param group.", (*JOB_RANK, "param_group"))
BATCH_SIZE = _g("batch_size", "Per-rank batch size at the last step (examples).")
STEP_SECONDS = _g("step_seconds", "Wall time of the rank's last step.", unit="seconds")
LOSS_SCALE = _g("loss_scale", "Mixed-precision loss scale (GradScaler) at the last step.")

# Window extremes: the rules engine sees every step, Prometheus one value per
# scrape. These hold the max/min over the exporter window (a sliding window of
# ``exporter.window_seconds``, longer than the scrape interval), so a spike
# between two scrapes is still drawn. Use max_over_time(<name>_max[$__interval]).
WINDOWED_SIGNALS: dict[str, Metric] = {"loss": LOSS, "grad_norm": GRAD_NORM, "update_ratio": UPDATE_RATIO,
                                       "step_seconds": STEP_SECONDS}


def _window(base: Metric, which: str) -> Metric:
    return Metric(f"{base.name}_window_{which}", MetricType.GAUGE,
                  f"{which.capitalize()} of {base.name} over the exporter window.", base.labels, base.unit)


WINDOW_MAX: dict[str, Metric] = {k: _window(m, "max") for k, m in WINDOWED_SIGNALS.items()}
WINDOW_MIN: dict[str, Metric] = {k: _window(m, "min") for k, m in WINDOWED_SIGNALS.items()}

# Per-step sums: a Summary without quantiles (<name>_per_step_sum and _count, both
# counters over every finite step the rank reported), so that
# rate(<name>_per_step_sum[5m]) / rate(<name>_per_step_count[5m]) is the mean per
# step over any range, whatever the scrape interval, and rate(..._count) is steps/s.
def _per_step(base: Metric) -> Metric:
    return Metric(f"{base.name}_per_step", MetricType.SUMMARY,
                  f"Sum and count of {base.name} over every step the rank reported (finite values).",
                  base.labels, base.unit)


PER_STEP: dict[str, Metric] = {k: _per_step(m) for k, m in WINDOWED_SIGNALS.items()}

STEPS_TOTAL = _c("steps_total", "Optimizer steps reported by the rank.")
NONFINITE_TOTAL = _c(
    "nonfinite_total",
    "Tensors found holding NaN/Inf: kind=loss (the loss), grads (gradient tensors), params (parameter tensors).",
    (*JOB_RANK, "kind"),
)
LAST_REPORT_TIMESTAMP = _g(
    "last_report_timestamp_seconds", "Unix time healthd last received a report from the rank.", unit="seconds"
)
RANK_CLOSED = _g(
    "rank_closed", "1 once the rank's monitor closed cleanly (its final heartbeat arrived), else 0: a finished "
    "job is told apart from a silent one."
)
CLIENT_DROPPED_TOTAL = _c(
    "client_reports_dropped_total", "Reports the rank's client dropped (queue full or healthd unreachable)."
)

# ----------------------------------------------------------------- per-job (distributed)
JOB = ("job", "stream")
GLOBAL_BATCH_SIZE = _g("global_batch_size",
                       "Examples per optimizer step over the whole job: per-rank batch x world size x "
                       "gradient accumulation steps.", JOB)
GRADIENT_NOISE_SCALE = _g("gradient_noise_scale",
                          "Simple gradient noise scale B_simple = tr(Sigma)/|G|^2 in examples (McCandlish et al. "
                          "2018), from DDP's local and all-reduced gradient norms.", JOB)

# ----------------------------------------------------------------- eval
EVAL_LOSS = _g("eval_loss", "Validation loss at the last monitor.eval().")
EVAL_ACCURACY = _g("eval_accuracy", "Validation accuracy at the last monitor.eval(), 0..1.")

# ----------------------------------------------------------------- per-layer (one rank reports)
LAYER_GRAD_NORM = _g("layer_grad_norm", "Per-layer gradient L2 norm at the last step.", JOB_LAYER)
LAYER_UPDATE_RATIO = _g("layer_update_ratio", "Per-layer update-to-weight ratio at the last step.", JOB_LAYER,
                        unit="ratio")
LAYER_PARAM_NORM = _g("layer_param_norm", "Per-layer parameter L2 norm at the last step.", JOB_LAYER)

# ----------------------------------------------------------------- GPU (client's NVML sampler)
# Labels: CUDA index as the job sees it (``gpu``), the physical GPU's NVML UUID and MIG GPU instance
# named as dcgm-exporter names them (``UUID``, ``GPU_I_ID``; empty outside MIG) so Grafana joins
# healthd's series with DCGM's on UUID, and the host. Bounded: one device per rank. ``stream`` is kept
# (label sets stay as they were) but a process samples its GPU once, in its first open monitor of the
# rank (healthd_client.attachment): several streams of one rank give one series, under that stream; when
# that monitor closes first, the sampler and the series move to another open stream (exposition.gpu).
GPU_LABELS = (*JOB_RANK, "gpu", "UUID", "GPU_I_ID", "hostname")
GPU_MEMORY_USED = _g("gpu_memory_used_bytes", "Device memory in use (NVML; the MIG slice's on MIG).", GPU_LABELS,
                     unit="bytes")
GPU_MEMORY_TOTAL = _g("gpu_memory_total_bytes", "Device memory (NVML; the MIG slice's on MIG).", GPU_LABELS,
                      unit="bytes")
GPU_TORCH_ALLOCATED = _g("gpu_torch_allocated_bytes", "Memory held by live tensors (torch.cuda.memory_allocated).",
                         GPU_LABELS, unit="bytes")
GPU_TORCH_RESERVED = _g("gpu_torch_reserved_bytes", "Memory held by torch's caching allocator "
                        "(torch.cuda.memory_reserved).", GPU_LABELS, unit="bytes")
GPU_TORCH_PEAK = _g("gpu_torch_peak_allocated_bytes", "High-water mark of tensor memory "
                    "(torch.cuda.max_memory_allocated).", GPU_LABELS, unit="bytes")
GPU_UTILIZATION = _g("gpu_utilization_ratio", "Fraction of the sample period a kernel ran (NVML); absent on MIG.",
                     GPU_LABELS, unit="ratio")
GPU_MEMORY_UTILIZATION = _g("gpu_memory_utilization_ratio", "Fraction of the sample period device memory was read "
                            "or written (NVML); absent on MIG.", GPU_LABELS, unit="ratio")
GPU_TEMPERATURE = _g("gpu_temperature_celsius", "GPU core temperature.", GPU_LABELS, unit="celsius")
GPU_POWER = _g("gpu_power_watts", "Board power draw.", GPU_LABELS, unit="watts")
GPU_ENERGY = _c("gpu_energy_joules_total", "Energy the GPU consumed since the driver loaded.", GPU_LABELS,
                unit="joules")
GPU_CLOCK_EVENT_ACTIVE = _g("gpu_clock_event_active", "1 for each clock event (throttle) reason NVML reports "
                            "active at the last sample, e.g. reason=hw_thermal_slowdown.", (*GPU_LABELS, "reason"))
GPU_ECC_UNCORRECTED = _c("gpu_ecc_uncorrected_errors_total", "Uncorrected ECC errors since the last driver load or "
                         "GPU reset (NVML volatile count).", GPU_LABELS)
GPU_REMAPPED_ROWS_FAILURE = _g("gpu_remapped_rows_failure", "1 when a memory row remapping failed (RMA).",
                               GPU_LABELS)
GPU_REMAPPED_ROWS_PENDING = _g("gpu_remapped_rows_pending", "1 when a memory row remap waits for a GPU reset.",
                               GPU_LABELS)
GPU_XID_EVENTS = _c("gpu_xid_events_total", "XID critical error events the rank's NVML watcher saw, by XID.",
                    (*GPU_LABELS, "xid"))

# ----------------------------------------------------------------- alerts
ALERT = _g(
    "alert",
    "1 while a healthd alert is firing. rank is empty for job-wide alerts, stream for a job's unnamed stream.",
    ("job", "rule", "severity", "rank", "stream"),
)

# ----------------------------------------------------------------- healthd self-metrics
REPORTS_RECEIVED_TOTAL = Metric(SELF_PREFIX + "reports_received_total", MetricType.COUNTER,
                                "Reports accepted, by kind.", ("kind",))
REPORTS_REJECTED_TOTAL = Metric(SELF_PREFIX + "reports_rejected_total", MetricType.COUNTER,
                                "Reports rejected, by reason.", ("reason",))
REQUESTS_TOTAL = Metric(SELF_PREFIX + "ingest_requests_total", MetricType.COUNTER,
                        "Ingest requests, by HTTP status code.", ("code",))
RULE_EVALUATION_SECONDS = Metric(SELF_PREFIX + "rule_evaluation_seconds", MetricType.SUMMARY,
                                 "Time spent evaluating rules.", (), "seconds")
JOBS = Metric(SELF_PREFIX + "jobs", MetricType.GAUGE, "Jobs currently tracked.", ())
RANK_EVALUATIONS_PENDING = Metric(SELF_PREFIX + "rank_evaluations_pending", MetricType.GAUGE,
                                  "Ranks whose newest steps wait for their rank-scoped rules "
                                  "(engine.rank_rules_cpu_share).", ())
RANK_EVALUATION_DELAY_SECONDS = Metric(SELF_PREFIX + "rank_evaluation_delay_seconds", MetricType.GAUGE,
                                       "How long the oldest step waiting for rank-scoped rules has waited; "
                                       "0 when none waits.", (), "seconds")
RANK_CHECKPOINTS_SHED_TOTAL = Metric(SELF_PREFIX + "rank_checkpoints_shed_total", MetricType.COUNTER,
                                     "Checkpoints of rank-scoped rules dropped unjudged because their rank fell "
                                     "further behind than their windows can be rebuilt (sustained overload past "
                                     "engine.rank_rules_cpu_share): while it grows, alerts may differ from an "
                                     "unloaded server's.", ())
ALERT_TRANSITIONS_TOTAL = Metric(SELF_PREFIX + "alert_transitions_total", MetricType.COUNTER,
                                 "Alert state transitions, by new state.", ("state",))
CARDINALITY_REJECTIONS_TOTAL = Metric(SELF_PREFIX + "cardinality_rejections_total", MetricType.COUNTER,
                                      "Reports (or, for max_layers_per_job, layers of a report) refused because "
                                      "a cardinality cap was reached, by cap (limits.<cap>).", ("cap",))
UNAUTHORIZED_REQUESTS_TOTAL = Metric(SELF_PREFIX + "unauthorized_requests_total", MetricType.COUNTER,
                                     "Requests refused with 401 (missing or wrong bearer token).", ())
JOBS_HANDED_OVER_TOTAL = Metric(SELF_PREFIX + "jobs_handed_over_total", MetricType.COUNTER,
                                "Jobs this shard forgot because the shard that cluster.route_url routes them to "
                                "heard from them later (they moved there, e.g. at failback): forgotten without "
                                "paging their stall.", ())

ALL: tuple[Metric, ...] = tuple(
    m for m in globals().values() if isinstance(m, Metric)
) + tuple(WINDOW_MAX.values()) + tuple(WINDOW_MIN.values()) + tuple(PER_STEP.values())


def by_name(name: str) -> Metric:
    """Look a metric up by its exposed name (raises KeyError)."""
    for m in ALL:
        if m.name == name:
            return m
    raise KeyError(name)
