"""healthd.wire.records against healthd.wire.schema: the records mirror the models, and the fast decoder agrees
with pydantic on every body it accepts (it may decline more, never accept more)."""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from healthd.wire.parse import _parse_with_pydantic, parse_batch
from healthd.wire.records import (
    ActivationRecord,
    InputRecord,
    LayerRecord,
    LossInputRecord,
    NameCheck,
    NonFiniteRecord,
    ShardRecord,
    StepRecord,
    decode_step,
    decode_steps,
    dump,
    to_record,
)
from healthd.wire.schema import (
    ActivationStats,
    InputStats,
    LayerStats,
    LossInputCheck,
    NonFinite,
    Report,
    ShardPart,
    StepReport,
)

_PAIRS = [(StepReport, StepRecord), (NonFinite, NonFiniteRecord), (LayerStats, LayerRecord),
          (ActivationStats, ActivationRecord), (InputStats, InputRecord), (LossInputCheck, LossInputRecord),
          (ShardPart, ShardRecord)]
_REPORT: TypeAdapter[Any] = TypeAdapter(Report)


def _same_default(model_default: Any, record_default: Any) -> bool:
    if isinstance(model_default, NonFinite):
        return isinstance(record_default, NonFiniteRecord) and model_default.loss == record_default.loss == 0
    return bool(model_default == record_default)


@pytest.mark.parametrize(("model", "record"), _PAIRS, ids=[m.__name__ for m, _ in _PAIRS])
def test_each_record_has_its_models_fields_and_defaults(model: Any, record: Any) -> None:
    fields = {f.name: f for f in msgspec.structs.fields(record)}
    model_fields = dict(model.__pydantic_fields__)
    if record is StepRecord:  # "kind" is the record's tag
        assert StepRecord.kind == "step" and StepRecord.__struct_config__.tag == "step"
        assert model_fields.pop("kind").default == "step"
    assert list(fields) == list(model_fields)
    for name, info in model_fields.items():
        f = fields[name]
        if info.is_required():
            assert f.required, name
        else:
            default = f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
            assert _same_default(info.get_default(call_default_factory=True), default), name


def test_a_record_is_frozen_rejects_unknown_fields_and_is_not_tracked_by_the_gc() -> None:
    import gc

    r = StepRecord(job="j", time=1.0, step=1)
    with pytest.raises(AttributeError):
        r.step = 2  # type: ignore[misc]
    assert not gc.is_tracked(r)
    assert decode_step(b'{"kind": "step", "job": "j", "time": 1, "step": 1, "typo": 1}', NameCheck()) is None


# ---------------------------------------------------------------- generated bodies: agreement with pydantic

_NASTY: list[Any] = [-1, 0, 1, 7, 1_000_000, 1_000_001, 2**64, -(2**63), 1.5, -0.0, 0.5, 1e308, math.nan, math.inf,
                     -math.inf, True, False, None, "", "x", "a" * 129, "a" * 257, "a b", "abc\n", "relu", [],
                     [1.0] * 65, [0.1, 2], {}, {"grad_norm": 1}, {"bad name": {}}, {"l": {"grad_norm": "1"}},
                     {"loss": 1}, {"kind": "relu"}]
_job = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:/@+\-]{0,12}", fullmatch=True),
                 st.sampled_from(["", "a b", "x\n", "-lead", "a" * 128, "a" * 129, "é"]))
_layer = st.one_of(st.from_regex(r"[A-Za-z0-9_.:\-\[\]]{1,12}", fullmatch=True),
                   st.sampled_from(["", "a b", "l\n", "a" * 128, "a" * 129]))
_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 2**65), st.none())
_nonneg = st.one_of(st.floats(0, 1e6), st.integers(0, 2**65), st.none())
_layer_stats = st.fixed_dictionaries({}, optional={"grad_norm": _num, "update_ratio": _num, "param_norm": _num,
                                                   "grad_missing": st.booleans()})
_activation = st.fixed_dictionaries({"kind": st.sampled_from(["relu", "sigmoid", "tanh", "other", "elu"])},
                                    optional={"dead_fraction": st.one_of(st.floats(-0.5, 1.5), st.none()),
                                              "saturated_fraction": st.one_of(st.floats(0, 1), st.none())})
_loss_input = st.fixed_dictionaries({"fn": st.text(max_size=4), "input_shape": st.lists(st.integers(-1, 9), max_size=3),
                                     "target_shape": st.lists(st.integers(0, 9), max_size=3)},
                                    optional={"rows_sum_to_one": st.booleans(), "broadcasts": st.booleans()})
_step = st.fixed_dictionaries(
    {"kind": st.just("step"), "job": _job, "time": st.one_of(st.floats(0, 2e9), st.integers(0, 2**40)),
     "step": st.integers(0, 2**40)},
    optional={"rank": st.integers(-1, 1_000_001), "loss": _num, "batch_size": st.one_of(st.integers(-1, 9), st.none()),
              "step_seconds": _nonneg, "lr": st.lists(st.floats(allow_nan=True), max_size=3),
              "grad_norm": _num, "grad_norm_local": _num, "update_ratio": _num, "comm_seconds": _nonneg,
              "nonfinite": st.fixed_dictionaries({}, optional={"loss": st.integers(-1, 3), "grads": st.integers(0, 3)}),
              "layers": st.dictionaries(_layer, _layer_stats, max_size=3), "training": st.booleans(),
              "loss_scale": _num, "step_skipped": st.one_of(st.booleans(), st.none()),
              "activations": st.dictionaries(_layer, _activation, max_size=2),
              "inputs": st.one_of(st.none(), st.fixed_dictionaries({"mean": _num, "std": _num, "abs_max": _num})),
              "loss_inputs": st.lists(_loss_input, max_size=2)})


@st.composite
def _mutated_step(draw: st.DrawFn) -> dict[str, Any]:
    """A step report, usually valid, sometimes with one field swapped for an odd value, a field
    dropped or an unknown one added: each constraint gets its boundary tried."""
    report = draw(_step)
    what = draw(st.sampled_from(["none", "none", "swap", "drop", "extra", "kind"]))
    if what == "swap":
        report[draw(st.sampled_from(sorted(StepReport.__pydantic_fields__)))] = draw(st.sampled_from(_NASTY))
    elif what == "drop":
        report.pop(draw(st.sampled_from(sorted(report))))
    elif what == "extra":
        report[draw(st.sampled_from(["typo", "Step", "kind_"]))] = 1
    elif what == "kind":
        report["kind"] = draw(st.sampled_from(["eval", "heartbeat", "Step", None, 1]))
    return report


def _pydantic(body: bytes) -> Any:
    try:
        return _REPORT.validate_json(body)
    except ValidationError:
        return None


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(report=_mutated_step())
def test_the_decoder_accepts_nothing_pydantic_rejects_and_gives_what_pydantic_gives(report: dict[str, Any]) -> None:
    body = json.dumps(report).encode()  # NaN and Infinity as the literals Python (and the client) writes
    fast, slow = decode_step(body, NameCheck()), _pydantic(body)
    if fast is not None:
        assert isinstance(slow, StepReport), body
        assert fast == to_record(slow), body
        assert dump(fast) == TypeAdapter(StepReport).dump_python(slow, mode="json")


_FULL = {"kind": "step", "job": "job-1", "rank": 3, "time": 1.7e9, "step": 12, "loss": 2.5, "batch_size": 32,
         "step_seconds": 0.1, "lr": [3e-4, 1e-3], "grad_norm": 1.0, "grad_norm_local": 0.9,
         "grad_norm_allreduced": 1.1, "comm_seconds": 0.01, "update_ratio": 1e-3,
         "nonfinite": {"loss": 0, "grads": 1, "params": 0},
         "layers": {"enc.0": {"grad_norm": 0.5, "update_ratio": 1e-3, "param_norm": 3.0, "grad_missing": False}},
         "training": True, "grads_stale_at_backward": False, "loss_scale": 65536.0, "step_skipped": False,
         "param_fingerprint": 0.25, "activations": {"act": {"kind": "relu", "dead_fraction": 0.5,
                                                            "saturated_fraction": 0.0}},
         "inputs": {"mean": 0.0, "std": 1.0, "abs_max": 3.0},
         "loss_inputs": [{"fn": "cross_entropy", "input_shape": [8, 10], "target_shape": [8],
                          "rows_sum_to_one": True, "all_non_negative": True, "all_non_positive": False,
                          "broadcasts": False}]}


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a report a value can be swapped: each key and list item, at any depth."""
    out = [path] if path else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out += _paths(v, (*path, k))
    return out


def _with(report: Any, path: tuple[Any, ...], value: Any) -> Any:
    report = json.loads(json.dumps(report))
    *parents, last = path
    target = report
    for k in parents:
        target = target[k]
    if value is _DROP:
        del target[last]
    else:
        target[last] = value
    return report


_DROP = object()


def test_every_field_at_every_depth_agrees_with_pydantic_on_every_odd_value() -> None:
    """Exhaustive where the generated test samples: each place in a full report, swapped for each odd
    value (and dropped, and joined by an unknown field), decodes as pydantic says or is declined."""
    names = NameCheck()
    bodies = [_with(_FULL, path, value) for path in _paths(_FULL) for value in [*_NASTY, _DROP]]
    bodies += [_with(_FULL, (*path[:-1], "typo"), 1) for path in _paths(_FULL) if isinstance(path[-1], str)]
    accepted = declined = 0
    for report in bodies:
        body = json.dumps(report).encode()
        fast, slow = decode_step(body, names), _pydantic(body)
        if fast is None:
            declined += slow is not None
            continue
        accepted += 1
        assert isinstance(slow, StepReport) and fast == to_record(slow), body
    assert accepted > 100 and declined < accepted  # most valid variants take the fast path


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(reports=st.lists(st.one_of(_mutated_step(), st.just({"kind": "heartbeat", "job": "j", "time": 1.0}),
                                  st.just(5)), max_size=6))
def test_a_batch_parses_as_pydantic_alone_parses_it(reports: list[Any]) -> None:
    body = json.dumps({"schema_version": 1, "reports": reports}).encode()
    fast, slow = parse_batch(body, 4, NameCheck()), _parse_with_pydantic(body, 4)
    assert repr(fast) == repr(slow), body  # repr: a NaN loss is not equal to itself


def test_bodies_the_decoder_declines_still_parse() -> None:
    step = {"kind": "step", "job": "j", "time": 1.0, "step": 3}
    for extra in ({"loss": math.nan}, {"loss": 1e400}, {"grad_norm": -math.inf}):
        parsed = parse_batch(json.dumps({"reports": [{**step, **extra}]}).encode(), 10, NameCheck())
        assert not parsed.rejected and len(parsed.reports) == 1
        assert isinstance(parsed.reports[0], StepRecord) and parsed.reports[0].step == 3
    mixed = parse_batch(json.dumps({"reports": [step, {"kind": "heartbeat", "job": "j", "time": 2.0}]}).encode(),
                        10, NameCheck())
    assert [r.kind for r in mixed.reports] == ["step", "heartbeat"]


def test_a_body_of_steps_is_decoded_in_one_go_as_report_by_report_or_declined_whole() -> None:
    steps = [{"kind": "step", "job": "j", "time": 1.0, "step": i, "loss": 0.5, "lr": [0.1],
              "layers": {"a.b": {"grad_norm": 1.0}}} for i in range(3)]

    def body(*reports: Any) -> bytes:
        return json.dumps({"schema_version": 1, "reports": list(reports)}).encode()

    names = NameCheck()
    whole = decode_steps(body(*steps), names)
    assert whole is not None and whole == [decode_step(json.dumps(s).encode(), names) for s in steps]
    # Anything the one-report decoder would decline declines the whole body (split and sorted out one by one).
    for odd in ({"kind": "heartbeat", "job": "j", "time": 2.0}, {**steps[0], "loss": math.nan},
                {**steps[0], "job": "bad name"}, {**steps[0], "layers": {"a b": {}}}, {**steps[0], "typo": 1}):
        assert decode_steps(body(steps[0], odd, steps[1]), names) is None, odd
    assert decode_steps(body(*steps)[:-1], names) is None  # not JSON
    assert decode_steps(b'{"schema_version": 2, "reports": []}', names) is None
    too_many = parse_batch(body(*steps), 2, names)
    assert too_many.body_error is not None and too_many.body_error.errors[0].type == "too_many_reports"


def test_names_are_checked_on_every_report_and_only_valid_ones_are_remembered() -> None:
    names = NameCheck(capacity=2)
    ok = StepRecord(job="job-1", time=1.0, step=1, layers={"enc.0": LayerRecord()})
    assert names.step_ok(ok) and names.step_ok(ok)
    assert not names.step_ok(StepRecord(job="job\n", time=1.0, step=1))  # Python's "$" would let it through
    assert not names.step_ok(StepRecord(job="job-1", time=1.0, step=1, layers={"a b": LayerRecord()}))
    assert not names.step_ok(StepRecord(job="j", time=1.0, step=1, activations={"": ActivationRecord(kind="relu")}))
    for i in range(5):  # past capacity the remembered names are forgotten, never wrongly kept
        assert names.step_ok(StepRecord(job=f"job-{i}", time=1.0, step=1))
    assert len(names._jobs) <= 2


def test_parse_batch_never_raises_on_mangled_bytes() -> None:
    """Bytes flipped, dropped and inserted into a valid body (invalid UTF-8, stray brackets, broken
    numbers): every outcome is an answer, never an exception (which the server would turn into a 500)."""
    import random

    base = json.dumps({"schema_version": 1, "reports": [
        {"kind": "step", "job": "j", "time": 1.0, "step": 3, "loss": 0.5, "lr": [0.1],
         "layers": {"a.b": {"grad_norm": 1.0}}}, {"kind": "heartbeat", "job": "j", "time": 2.0}]}).encode()
    rng = random.Random(0)
    names = NameCheck()
    for _ in range(20_000):
        body = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            i, op = rng.randrange(len(body)), rng.random()
            if op < 0.4:
                body[i] = rng.randrange(256)
            elif op < 0.7:
                del body[i]
            else:
                body.insert(i, rng.choice(b'{}[]",:0123456789.eE+-tfnulNaIy\\\xff\xc3'))
        parse_batch(bytes(body), 100, names)
