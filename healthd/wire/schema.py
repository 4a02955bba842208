"""The wire contract between healthd_client and healthd, versioned.

What lives here: the pydantic v2 models of a report batch (``POST /v1/reports``)
and of the read API's answers. What does not: anything that needs the server's
dependencies. The client imports this module only, so it must stay importable
with pydantic alone.

Conventions:
- Times are Unix seconds (float), durations are seconds, memory is bytes,
  utilisations are ratios in 0..1.
- NaN and +/-Inf are data (a NaN loss is the finding), so floats allow them and
  JSON carries them as the literals ``NaN``, ``Infinity`` and ``-Infinity``
  (what Python's ``json`` module writes).
- Unknown fields are rejected (``extra="forbid"``) so a typo is a 4xx naming
  the field, not silently lost data.

Why this module is over 400 lines: it is the wire contract, one declaration per report kind and
field (the OpenAPI document and the fast decoder are derived from it); splitting it would put one
contract in several places.
"""

from __future__ import annotations

import enum
from dataclasses import field as _field
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.dataclasses import dataclass as _pydantic_dataclass
from typing_extensions import dataclass_transform

SCHEMA_VERSION = 1
# The job of every report in a ``POST /v1/reports`` body, as a request header: a proxy can route on it
# (consistent hashing by job, docs/scaling.md) without reading the body. Optional (older clients do
# not send it); when sent, every report's ``job`` must equal it, or the batch is refused whole (400).
JOB_HEADER = "X-Healthd-Job"

# Label values end up in Prometheus series and Alertmanager labels: keep them
# short and printable. Layer names are module paths ("encoder.layers.0.attn").
JobName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/@+\-]*$")
]
LayerName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-\[\]]+$")
]
ShortText = Annotated[str, StringConstraints(max_length=256)]
# Other values that become Prometheus label values (GPU UUID, hostname, clock-event reason) or
# keys a person reads (eval metric names): printable, no spaces or quotes, bounded. The client
# sanitises what it does not control (healthd_client.identity.label_safe).
LABEL_SAFE_PATTERN = r"^[A-Za-z0-9_.:/@+\-]+$"
DeviceId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=LABEL_SAFE_PATTERN)]
HostName = Annotated[str, StringConstraints(max_length=253, pattern=r"^[A-Za-z0-9_.:\-]*$")]
MetricName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=LABEL_SAFE_PATTERN)]
ReasonName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9_]+$")]
Rank = Annotated[int, Field(ge=0, le=1_000_000)]
# A named stream of a job's rank: one monitor of several in one process (a GAN's generator and
# discriminator, each with its optimizer). It becomes an alert and series label, so it is a short
# identifier; absent (None) is the job's single unnamed stream, the identity a job had before streams.
STREAM_PATTERN = r"^[a-z0-9_.\-]{1,32}$"
StreamName = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=STREAM_PATTERN)]
Count = Annotated[int, Field(ge=0)]
Step = Annotated[int, Field(ge=0)]
UnixTime = Annotated[float, Field(allow_inf_nan=False, ge=0)]
Ratio = Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=1.0)]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        ser_json_inf_nan="constants",
    )


class Severity(str, enum.Enum):
    """Alert severity, as routed on by Alertmanager (`severity` label)."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def level(self) -> int:
        return _SEVERITY_LEVEL[self]


_SEVERITY_LEVEL = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


class AlertState(str, enum.Enum):
    """Lifecycle of an alert, as in Prometheus: pending -> firing -> resolved."""

    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


# --------------------------------------------------------------------------- reports


_T = TypeVar("_T")


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(Field, _field))
def _record(cls: type[_T]) -> type[_T]:
    """The wire rules of ``_Model`` (strict, unknown fields rejected, NaN/Inf as JSON literals) on a
    frozen slotted dataclass instead of a BaseModel: a step report and its parts, thousands of ranks
    times hundreds of steps. An instance is one object (no ``__dict__``, no fields-set set). The
    server keeps these as ``healthd.wire.records.StepRecord`` (msgspec structs, decoded without building
    these)."""
    return _pydantic_dataclass(config=ConfigDict(extra="forbid", strict=True, ser_json_inf_nan="constants"),
                               frozen=True, slots=True, kw_only=True)(cls)  # type: ignore[return-value]  # pydantic types it as type[PydanticDataclass]


class _ReportBase(_Model):
    job: JobName
    rank: Rank = 0
    stream: StreamName | None = None  # healthd keeps windows per (job, rank, stream)
    time: UnixTime


@_record
class NonFinite:
    """Counts of tensors holding NaN/Inf in a step (tensors, not elements: a non-finite norm says so cheaply).

    ``params`` is measured every ``heavy_every_steps`` only; 0 on other steps means "not measured or clean".
    """

    loss: Count = 0
    grads: Count = 0
    params: Count = 0


@_record
class LayerStats:
    """Per-layer statistics. A layer is the parameter tensors of one module."""

    grad_norm: float | None = None
    update_ratio: float | None = None
    param_norm: float | None = None
    grad_missing: bool = False  # every parameter of the layer had grad None
    # Sharded models (see ShardPart): this rank's parts; healthd fills grad_norm and update_ratio from them.
    grad_sq: float | None = None
    update_sq: float | None = None
    weight_sq: float | None = None


# The most tensor positions a ShardPart lists as non-finite (a rank with more sends none: a whole model
# gone NaN needs no exact union).
MAX_NONFINITE_TENSORS = 4096


@_record
class ShardPart:
    """This rank's part of quantities that are sums over a sharded model (FSDP2, HSDP).

    Under FSDP each rank holds a shard of every parameter and of its gradient, so a rank can only
    measure sums of squares over its own shard; the job's value is the sum over the ranks of one
    shard group (the ranks that together hold one full copy). healthd adds the parts of a step once
    every rank of the group has reported it, and fills the step's ``grad_norm`` and ``update_ratio``
    on each of them. Under HSDP the groups are the replicas (``group`` = the rank's coordinate along
    the replicate dimension of the device mesh); under FSDP there is one group.
    """

    group: Count = 0  # which shard group (replica): FSDP2's replicate coordinate, FSDP1's lowest rank in it
    index: Count  # this rank's position in its group (coordinate along the shard dimension)
    count: Annotated[int, Field(ge=1)]  # how many ranks the group has
    grad_sq: float | None = None  # sum of squares of this rank's gradient shards
    update_sq: float | None = None  # ||w_t - w_{t-1}||^2 over this rank's (sampled) parameter shards
    weight_sq: float | None = None  # ||w_{t-1}||^2 over the same elements
    # Which parameter tensors (positions in the optimizer's parameter order, the same on every rank) have a
    # NaN/Inf in this rank's shard of their gradient / of the parameter. A tensor split over ranks may be bad
    # on several of them, so counts cannot be added: healthd counts the union, the tensors of the full
    # gradient (parameters) holding a NaN/Inf, and writes it into ``nonfinite`` on every rank of the group.
    # None: not measured this step, or more than MAX_NONFINITE_TENSORS (the rank's own count then stands).
    grad_nonfinite: list[Count] | None = Field(default=None, max_length=MAX_NONFINITE_TENSORS)
    param_nonfinite: list[Count] | None = Field(default=None, max_length=MAX_NONFINITE_TENSORS)


@_record
class ActivationStats:
    """Sampled forward-hook statistics of one activation layer."""

    kind: Literal["relu", "sigmoid", "tanh", "other"]
    dead_fraction: Ratio | None = None  # units never active over the batch
    saturated_fraction: Ratio | None = None  # units in the flat region over the batch


@_record
class InputStats:
    """Sampled statistics of the model's first floating-point input."""

    mean: float
    std: float
    abs_max: float


@_record
class LossInputCheck:
    """What a sampled loss call was given (SoftmaxBeforeLoss, LossInputBroadcast)."""

    fn: ShortText  # e.g. "cross_entropy", "nll_loss", "mse_loss"
    input_shape: list[Count]
    target_shape: list[Count]
    rows_sum_to_one: bool = False  # input looks like probabilities along the class dim
    all_non_negative: bool = False
    all_non_positive: bool = False  # looks like log-probabilities
    broadcasts: bool = False  # input and target shapes differ but broadcast


@_record
class StepReport:
    """One optimizer step on one rank."""

    job: JobName
    rank: Rank = 0
    stream: StreamName | None = None
    time: UnixTime
    kind: Literal["step"] = "step"
    step: Step
    loss: float | None = None
    batch_size: Count | None = None
    step_seconds: float | None = Field(default=None, ge=0)
    lr: list[float] = Field(default_factory=list, max_length=64)  # per param group
    grad_norm: float | None = None  # global L2 norm of the gradients the optimizer saw
    # Sharded models: this rank's partial sums (the server fills grad_norm and update_ratio from them).
    shard: ShardPart | None = None
    grad_norm_local: float | None = None  # this rank's norm before all-reduce (DDP)
    grad_norm_allreduced: float | None = None  # norm of the all-reduced gradient, in the DDP comm hook
    # Wall time from the first gradient bucket handed to DDP's comm hook to the last one reduced: mostly
    # waiting for slower ranks. step_seconds - comm_seconds is the rank's own work (StragglerRank).
    comm_seconds: float | None = Field(default=None, ge=0)
    update_ratio: float | None = None  # ||w_t - w_{t-1}|| / ||w_{t-1}|| over all params
    nonfinite: NonFinite = NonFinite()  # immutable: every clean step shares one
    layers: dict[LayerName, LayerStats] = Field(default_factory=dict)
    training: bool | None = None  # model.training when the optimizer stepped
    grads_stale_at_backward: bool | None = None  # grads non-zero when backward began
    loss_scale: float | None = None  # AMP GradScaler scale
    step_skipped: bool | None = None  # AMP skipped the step (inf/nan grads)
    param_fingerprint: float | None = None  # cheap checksum of params (RankDesync)
    activations: dict[LayerName, ActivationStats] = Field(default_factory=dict)
    inputs: InputStats | None = None
    loss_inputs: list[LossInputCheck] = Field(default_factory=list, max_length=16)


class EvalReport(_ReportBase):
    """A validation pass (``monitor.eval``)."""

    kind: Literal["eval"] = "eval"
    step: Step
    loss: float | None = None
    accuracy: float | None = None
    metrics: dict[MetricName, float] = Field(
        default_factory=dict, max_length=32
    )


class DisabledQuantity(_Model):
    """A measurement the client stopped making, and why (MonitoringDegraded shows it to on-call)."""

    name: ShortText  # the quantity, e.g. "grad_norm"
    reason: ShortText  # where it failed and the exception, as the client's warning says


class HeartbeatReport(_ReportBase):
    """Sent on a timer, independent of steps: tells a hang from an exit."""

    kind: Literal["heartbeat"] = "heartbeat"
    step: Step | None = None  # last step the rank completed
    reports_dropped_total: Count = 0  # client queue overflow / send failures
    reports_sent_total: Count = 0
    closing: bool = False  # the monitor is closing (clean exit)
    # Quantities this rank no longer measures: the signals (and rules) that depend on them are blind.
    disabled_quantities: list[DisabledQuantity] = Field(default_factory=list, max_length=64)


class LayerInfo(_Model):
    name: LayerName
    module_type: ShortText
    params: Count
    shapes: list[list[Count]] = Field(default_factory=list)


class ModelSummary(_Model):
    param_count: Count
    trainable_count: Count
    layers: list[LayerInfo] = Field(default_factory=list)


class OptimizerInfo(_Model):
    name: ShortText
    param_groups: Count = 1
    hyperparams: dict[ShortText, float | int | bool | str | None] = Field(default_factory=dict)


class Hints(_Model):
    """What the user told attach() (or the client inferred)."""

    dataset_size: Count | None = None
    num_classes: Count | None = None
    grad_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    # The job starts from pretrained weights (attach(fine_tune=True), or the client saw a peft
    # wrapper or a Hugging Face model loaded by name): its first loss is below chance by design.
    fine_tune: bool = False
    # What the training loop does with this stream's loss. "adversarial": a GAN's generator or
    # discriminator loss, which goes up when the other player improves; the loss-shape rules
    # (LossPlateau, LossDiverging, LossOscillating, InitialLossUnexpected) do not judge it.
    loss_kind: Literal["minimized", "adversarial"] = "minimized"


class StaticFinding(_Model):
    """A structural fact found by inspecting the model at attach time."""

    check: Literal["dropout_before_batchnorm", "batchnorm", "sync_batchnorm",
                   # the optimizer holds frozen tensors while trainable ones (layer) are missing from it
                   "frozen_in_optimizer", "trainable_not_in_optimizer"]
    layer: LayerName | None = None
    detail: ShortText = ""


class AttachReport(_ReportBase):
    """Sent once per rank at attach: the job's setup ("track your work")."""

    kind: Literal["attach"] = "attach"
    world_size: Annotated[int, Field(ge=1)] = 1
    local_rank: Rank = 0
    hostname: HostName = ""
    run_id: ShortText | None = None
    model: ModelSummary | None = None
    optimizer: OptimizerInfo | None = None
    hints: Hints = Hints()
    static_findings: list[StaticFinding] = Field(default_factory=list, max_length=256)
    versions: dict[ShortText, ShortText] = Field(default_factory=dict)
    git_commit: ShortText | None = None
    # Random per monitor (per attach() call): a second monitor claiming a (job, rank, stream) another
    # live monitor holds is refused, so two step streams never silently interleave in one window.
    monitor_id: Annotated[str, StringConstraints(max_length=64, pattern=r"^[A-Za-z0-9_\-]*$")] | None = None


class GpuReport(_ReportBase):
    """A sample of this rank's GPU, read through NVML and torch's allocator."""

    kind: Literal["gpu"] = "gpu"
    gpu: Annotated[int, Field(ge=0)]  # CUDA index as the job sees it
    uuid: DeviceId  # the physical GPU's NVML UUID ("GPU-..."), dcgm-exporter's UUID label
    hostname: HostName = ""
    mig: bool = False
    mig_uuid: DeviceId | None = None  # the MIG device's own UUID ("MIG-...") on a MIG slice
    gpu_instance_id: Annotated[int, Field(ge=0)] | None = None  # MIG GPU instance (dcgm-exporter's GPU_I_ID)
    memory_used_bytes: Count | None = None
    memory_total_bytes: Count | None = None
    torch_allocated_bytes: Count | None = None
    torch_reserved_bytes: Count | None = None
    torch_peak_bytes: Count | None = None
    utilization_gpu_ratio: Ratio | None = None  # None where unsupported (MIG)
    utilization_memory_ratio: Ratio | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    energy_joules: float | None = None
    throttle_reasons: list[ReasonName] = Field(default_factory=list, max_length=32)
    ecc_uncorrected_total: Count | None = None
    remapped_rows_failure: bool | None = None
    remapped_rows_pending: bool | None = None  # a row remap waits for a GPU reset
    xid_events: list[int] = Field(default_factory=list, max_length=64)


Report = Annotated[
    StepReport | EvalReport | HeartbeatReport | AttachReport | GpuReport,
    Field(discriminator="kind"),
]


class ReportBatch(_Model):
    """Body of ``POST /v1/reports``."""

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    reports: list[Report]


class FieldError(_Model):
    loc: list[str | int]
    msg: str
    type: str


class Rejection(_Model):
    index: int  # position in ``reports``; -1 when the whole body is at fault
    errors: list[FieldError]


MAX_ALERTS_IN_ANSWER = 32  # IngestResult.alerts: one per (job, rule), so more than the rules there are is rare


class FiringAlert(_Model):
    """A firing alert as the report push's answer carries it back to the job (``IngestResult.alerts``)."""

    id: str
    rule: str  # the alertname, e.g. "NonFiniteValues"
    severity: Severity
    job: str
    rank: int | None  # None for a job-scoped rule
    stream: str | None = None  # the rank's named stream (attach(stream=...)); None: the unnamed one
    layer: str | None = None
    step: int | None  # step at which the condition was first seen
    summary: str
    evidence: dict[str, float | int | str | bool | None]


class IngestResult(_Model):
    """Answer of ``POST /v1/reports``: 200 when all were accepted, else 4xx.

    ``alerts`` closes the loop to the training process: the alerts firing now for the jobs of this
    batch (every rank's and the job's own, since the ranks of a distributed job stop together), one
    per (job, rule) (this batch's rank's when it has one, else the first started), most severe first,
    at most ``MAX_ALERTS_IN_ANSWER``. Left out of the answer when nothing fires (the answer is then
    the one healthd gave before alerts existed); clients that predate it ignore it.
    """

    accepted: int
    rejected: list[Rejection] = Field(default_factory=list)
    alerts: list[FiringAlert] = Field(default_factory=list, max_length=MAX_ALERTS_IN_ANSWER)


# --------------------------------------------------------------------------- read API


class AlertOut(_Model):
    """One alert as ``GET /v1/alerts`` returns it."""

    id: str
    rule: str
    severity: Severity
    state: AlertState
    job: str
    rank: int | None
    stream: str | None = None  # the named stream (attach(stream=...)); None: the job's unnamed stream
    layer: str | None = None
    step: int | None  # step at which the condition was first seen
    last_step: int | None = None
    summary: str
    evidence: dict[str, float | int | str | bool | None]
    advice: str
    started_at: float
    updated_at: float
    resolved_at: float | None = None
    # Incidents (healthd.engine.incidents): the likely cause's rule, and the incident's id (its root
    # alert's). Both None for an alert that never fired; defaulted, so older clients keep working.
    caused_by: str | None = None
    incident: str | None = None
