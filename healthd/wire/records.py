"""What healthd keeps of every step: ``StepReport`` as a msgspec Struct, and the fast decoder that builds it.

``healthd.wire.schema`` is the wire contract (pydantic: the OpenAPI document, the client's models, the
error messages). Validating every step report with it costs more than everything else ingest does
with the report, and the ``StepReport`` dataclass it builds cannot be made cheaper: building one
without validation from Python code costs about as much as validating it. So the server decodes step
reports with msgspec straight into ``StepRecord`` (C code: 2.2 µs per report in-process where
pydantic takes 5.7, and the result is not tracked by the garbage collector), and keeps those.

The contract stays pydantic's: the decoder here may be *stricter* (decline what pydantic would
accept: a NaN literal, a number out of double range, any report that is not a step), never laxer.
Whatever it declines goes to pydantic, which accepts or rejects it with its own messages; a
``StepReport`` pydantic accepts becomes a record through ``to_record``. tests/healthd/test_records.py
holds the two together: the records mirror the models field for field, and for generated bodies the
decoder either declines or gives exactly ``to_record`` of what pydantic gives.

Names are checked outside msgspec: it runs ``pattern`` constraints through Python's ``re`` for
every string (a job name and a few layer names per report, most of the decode's time), while a job
has a handful of distinct names. ``NameCheck`` remembers the names that passed (bounded).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, cast

import msgspec
from msgspec import Meta, Struct

from healthd.wire.schema import MAX_NONFINITE_TENSORS, JobName, LayerName, StepReport, StreamName

# The constraints of healthd.wire.schema's types, as msgspec reads them (names: see NameCheck).
_Count = Annotated[int, Meta(ge=0)]
_Rank = Annotated[int, Meta(ge=0, le=1_000_000)]
_Seconds = Annotated[float, Meta(ge=0)]
_Ratio = Annotated[float, Meta(ge=0.0, le=1.0)]
_ShortText = Annotated[str, Meta(max_length=256)]


class _Record(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Frozen, unknown fields rejected (``extra="forbid"``), untracked by the garbage collector
    (a record holds numbers, strings and other records: it cannot be part of a cycle)."""


class NonFiniteRecord(_Record, frozen=True):
    loss: _Count = 0
    grads: _Count = 0
    params: _Count = 0


class LayerRecord(_Record, frozen=True):
    grad_norm: float | None = None
    update_ratio: float | None = None
    param_norm: float | None = None
    grad_missing: bool = False
    grad_sq: float | None = None
    update_sq: float | None = None
    weight_sq: float | None = None


class ShardRecord(_Record, frozen=True, kw_only=True):
    group: _Count = 0
    index: _Count
    count: Annotated[int, Meta(ge=1)]
    grad_sq: float | None = None
    update_sq: float | None = None
    weight_sq: float | None = None
    grad_nonfinite: Annotated[list[_Count], Meta(max_length=MAX_NONFINITE_TENSORS)] | None = None
    param_nonfinite: Annotated[list[_Count], Meta(max_length=MAX_NONFINITE_TENSORS)] | None = None


class ActivationRecord(_Record, frozen=True):
    kind: Literal["relu", "sigmoid", "tanh", "other"]
    dead_fraction: _Ratio | None = None
    saturated_fraction: _Ratio | None = None


class InputRecord(_Record, frozen=True):
    mean: float
    std: float
    abs_max: float


class LossInputRecord(_Record, frozen=True):
    fn: _ShortText
    input_shape: list[_Count]
    target_shape: list[_Count]
    rows_sum_to_one: bool = False
    all_non_negative: bool = False
    all_non_positive: bool = False
    broadcasts: bool = False


CLEAN = NonFiniteRecord()  # every clean step shares one


class StepRecord(_Record, frozen=True, kw_only=True, tag_field="kind", tag="step"):
    """``healthd.wire.schema.StepReport``, field for field (its docs say what each one means)."""

    kind: ClassVar[str] = "step"  # the tag, readable like the model's field

    job: str  # NameCheck
    rank: _Rank = 0
    stream: str | None = None  # NameCheck
    time: _Seconds
    step: _Count
    loss: float | None = None
    batch_size: _Count | None = None
    step_seconds: _Seconds | None = None
    lr: Annotated[list[float], Meta(max_length=64)] = []
    grad_norm: float | None = None
    shard: ShardRecord | None = None
    grad_norm_local: float | None = None
    grad_norm_allreduced: float | None = None
    comm_seconds: _Seconds | None = None
    update_ratio: float | None = None
    nonfinite: NonFiniteRecord = CLEAN
    layers: dict[str, LayerRecord] = {}  # NameCheck
    training: bool | None = None
    grads_stale_at_backward: bool | None = None
    loss_scale: float | None = None
    step_skipped: bool | None = None
    param_fingerprint: float | None = None
    activations: dict[str, ActivationRecord] = {}  # NameCheck
    inputs: InputRecord | None = None
    loss_inputs: Annotated[list[LossInputRecord], Meta(max_length=16)] = []


class _NotAStep(Struct, tag_field="kind", tag="\0"):
    """Never matches: its presence makes the decoder require the ``kind`` tag, as pydantic's
    discriminated union does (a lone tagged Struct would accept a report without one)."""


class _Batch(Struct, forbid_unknown_fields=True, kw_only=True):
    schema_version: Literal[1] = 1  # healthd.wire.schema.SCHEMA_VERSION
    reports: list[msgspec.Raw]


class _StepBatch(Struct, forbid_unknown_fields=True, kw_only=True):
    """``_Batch`` whose reports are all steps: each decoded as ``decode_step`` decodes one."""

    schema_version: Literal[1] = 1
    reports: list[StepRecord | _NotAStep]


def _name_rule(name_type: Any) -> tuple[re.Pattern[str], int, int]:
    c = name_type.__metadata__[0]  # the StringConstraints of healthd.wire.schema's JobName, LayerName
    return re.compile(c.pattern), c.min_length, c.max_length


class NameCheck:
    """Job, stream and layer names against healthd.wire.schema's ``JobName``, ``StreamName`` and
    ``LayerName``, remembering up to ``capacity`` names that passed (forgotten all at once past that:
    names are bounded by the cardinality caps in practice, the capacity bounds memory whatever the input)."""

    def __init__(self, capacity: int = 65_536) -> None:
        self.capacity = capacity
        self._jobs: set[str] = set()
        self._layers: set[str] = set()
        self._streams: set[str] = set()
        self._job_rule = _name_rule(JobName)
        self._layer_rule = _name_rule(LayerName)
        self._stream_rule = _name_rule(StreamName)

    @staticmethod
    def _valid(name: str, rule: tuple[re.Pattern[str], int, int]) -> bool:
        pattern, lo, hi = rule
        # fullmatch: pydantic matches with the Rust regex crate, where "$" is the end of the text; with
        # re.match, Python's "$" would also match before a final newline ("job\n").
        return lo <= len(name) <= hi and pattern.fullmatch(name) is not None

    def _remember(self, known: set[str], name: str) -> None:
        if len(known) >= self.capacity:
            known.clear()
        known.add(name)

    def step_ok(self, r: StepRecord) -> bool:
        if r.job not in self._jobs:
            if not self._valid(r.job, self._job_rule):
                return False
            self._remember(self._jobs, r.job)
        if r.stream is not None and r.stream not in self._streams:
            if not self._valid(r.stream, self._stream_rule):
                return False
            self._remember(self._streams, r.stream)
        known = self._layers
        for names in (r.layers, r.activations):
            if names and not names.keys() <= known:
                for name in names:
                    if name not in known:
                        if not self._valid(name, self._layer_rule):
                            return False
                        self._remember(known, name)
        return True


_BATCH_DECODER = msgspec.json.Decoder(_Batch)
_STEP_BATCH_DECODER = msgspec.json.Decoder(_StepBatch)
_STEP_DECODER = msgspec.json.Decoder(StepRecord | _NotAStep)
# What msgspec raises on input it cannot take, all of it declined (pydantic then answers): its own errors,
# ValueError (a string that is not UTF-8 is a UnicodeDecodeError) and RecursionError (JSON nested
# deeper than the interpreter's recursion limit).
DECODE_ERRORS = (msgspec.DecodeError, ValueError, RecursionError)


def split_batch(body: bytes) -> list[msgspec.Raw] | None:
    """The reports of a ``ReportBatch`` body, each still encoded; None when the body is not a
    well-formed batch object to msgspec (pydantic then says what is wrong, or accepts it)."""
    try:
        return _BATCH_DECODER.decode(body).reports
    except DECODE_ERRORS:
        return None


def decode_steps(body: bytes, names: NameCheck) -> list[StepRecord] | None:
    """Every report of a ``ReportBatch`` body as a record, in one decode, when this decoder takes
    every one of them (what ``decode_step`` of each would give); None when it declines the body or
    any report in it (``split_batch`` and ``decode_step`` then sort them out one by one). The common
    body, a rank's queue of step reports, costs one call instead of one per report."""
    try:
        reports = _STEP_BATCH_DECODER.decode(body).reports
    except DECODE_ERRORS:
        return None
    for r in reports:
        if not (isinstance(r, StepRecord) and names.step_ok(r)):
            return None
    return cast(list[StepRecord], reports)  # each checked to be a StepRecord above


def decode_step(raw: msgspec.Raw | bytes, names: NameCheck) -> StepRecord | None:
    """A step report as a record; None when this decoder declines it (not a step, invalid, or
    valid only to pydantic: pydantic decides)."""
    try:
        r = _STEP_DECODER.decode(raw)
    except DECODE_ERRORS:
        return None
    return r if isinstance(r, StepRecord) and names.step_ok(r) else None


def to_record(s: StepReport) -> StepRecord:
    """A validated ``StepReport`` (pydantic's) as the record the store keeps."""
    nf = s.nonfinite
    return StepRecord(
        job=s.job, rank=s.rank, stream=s.stream, time=s.time, step=s.step, loss=s.loss, batch_size=s.batch_size,
        step_seconds=s.step_seconds, lr=list(s.lr), grad_norm=s.grad_norm,
        shard=None if s.shard is None else ShardRecord(
            group=s.shard.group, index=s.shard.index, count=s.shard.count, grad_sq=s.shard.grad_sq,
            update_sq=s.shard.update_sq, weight_sq=s.shard.weight_sq,
            grad_nonfinite=None if s.shard.grad_nonfinite is None else list(s.shard.grad_nonfinite),
            param_nonfinite=None if s.shard.param_nonfinite is None else list(s.shard.param_nonfinite)),
        grad_norm_local=s.grad_norm_local,
        grad_norm_allreduced=s.grad_norm_allreduced, comm_seconds=s.comm_seconds, update_ratio=s.update_ratio,
        nonfinite=CLEAN if not (nf.loss or nf.grads or nf.params) else NonFiniteRecord(
            loss=nf.loss, grads=nf.grads, params=nf.params),
        layers={k: LayerRecord(grad_norm=v.grad_norm, update_ratio=v.update_ratio, param_norm=v.param_norm,
                               grad_missing=v.grad_missing, grad_sq=v.grad_sq, update_sq=v.update_sq,
                               weight_sq=v.weight_sq) for k, v in s.layers.items()},
        training=s.training, grads_stale_at_backward=s.grads_stale_at_backward, loss_scale=s.loss_scale,
        step_skipped=s.step_skipped, param_fingerprint=s.param_fingerprint,
        activations={k: ActivationRecord(kind=v.kind, dead_fraction=v.dead_fraction,
                                         saturated_fraction=v.saturated_fraction) for k, v in s.activations.items()},
        inputs=None if s.inputs is None else InputRecord(mean=s.inputs.mean, std=s.inputs.std,
                                                         abs_max=s.inputs.abs_max),
        loss_inputs=[LossInputRecord(fn=c.fn, input_shape=list(c.input_shape), target_shape=list(c.target_shape),
                                     rows_sum_to_one=c.rows_sum_to_one, all_non_negative=c.all_non_negative,
                                     all_non_positive=c.all_non_positive, broadcasts=c.broadcasts)
                     for c in s.loss_inputs],
    )


def dump(r: StepRecord) -> dict[str, Any]:
    """A record as JSON-ready data: what ``healthd.wire.schema.dump`` gives for the ``StepReport``."""
    out: dict[str, Any] = msgspec.to_builtins(r)
    return out
