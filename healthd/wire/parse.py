"""Parsing a report batch: keep every valid report, say exactly what is wrong with the rest.

The fast path decodes a body of step reports with msgspec in one go, straight into the records the
store keeps (``healthd.wire.records``). Any other body is split into its reports, and each step report
decoded on its own the same way. A report that decoder declines (any other
kind, an invalid report, a NaN literal) is validated by pydantic on its own, so one bad report
costs its sender a 422 naming the field while its neighbours are kept. A body msgspec cannot split
goes to pydantic whole: it is either valid only to pydantic (NaN/Inf literals) or wrong as a body.
Step reports come out as ``StepRecord``s whichever path they took.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from healthd.wire.records import NameCheck, decode_step, decode_steps, split_batch, to_record
from healthd.wire.schema import SCHEMA_VERSION, FieldError, Rejection, Report, ReportBatch, StepReport

_BATCH = TypeAdapter(ReportBatch)
_REPORT: TypeAdapter[Any] = TypeAdapter(Report)


@dataclass
class Parsed:
    reports: list[Any] = field(default_factory=list)
    indices: list[int] | None = None  # position of each report in the body; None: 0..len-1
    rejected: list[Rejection] = field(default_factory=list)
    body_error: Rejection | None = None  # the body as a whole is unusable


def _errors(e: ValidationError) -> list[FieldError]:
    out = []
    for err in e.errors(include_url=False):
        msg, type_ = err["msg"], err["type"]
        if type_ == "unexpected_keyword_argument":  # an unknown field of a record (schema._record)
            msg, type_ = "Extra inputs are not permitted", "extra_forbidden"  # as for every other model
        out.append(FieldError(loc=list(err["loc"]), msg=msg, type=type_))
    return out


def _body_error(msg: str, type_: str, loc: list[str | int] | None = None) -> Parsed:
    return Parsed(body_error=Rejection(index=-1, errors=[FieldError(loc=loc or [], msg=msg, type=type_)]))


def _too_many(n: int, max_reports: int) -> Parsed:
    return _body_error(f"too many reports in one request: {n} > limit {max_reports} "
                       "(limits.max_reports_per_request)", "too_many_reports", ["reports"])


def _rejection(index: int, e: ValidationError) -> Rejection:
    """Report ``index`` of the body refused, each error located from the body's root."""
    return Rejection(index=index, errors=[FieldError(loc=["reports", index, *fe.loc], msg=fe.msg, type=fe.type)
                                          for fe in _errors(e)])


def _record(report: Any) -> Any:
    return to_record(report) if isinstance(report, StepReport) else report


def parse_batch(body: bytes, max_reports: int, names: NameCheck) -> Parsed:
    """Validate a ``ReportBatch`` body; never raises. ``names``: the job and layer names already
    known valid (``records.NameCheck``, one per server)."""
    steps = decode_steps(body, names)
    if steps is not None:
        return _too_many(len(steps), max_reports) if len(steps) > max_reports else Parsed(reports=steps)
    raws = split_batch(body)
    if raws is None:
        return _parse_with_pydantic(body, max_reports)
    if len(raws) > max_reports:
        return _too_many(len(raws), max_reports)
    reports: list[Any] = []
    indices: list[int] = []
    rejected: list[Rejection] = []
    for i, raw in enumerate(raws):
        report: Any = decode_step(raw, names)
        if report is None:
            try:  # declined: pydantic decides, and says what is wrong
                report = _record(_REPORT.validate_json(bytes(raw)))
            except ValidationError as e:
                rejected.append(_rejection(i, e))
                continue
        reports.append(report)
        indices.append(i)
    return Parsed(reports=reports, indices=indices if rejected else None, rejected=rejected)


def _parse_with_pydantic(body: bytes, max_reports: int) -> Parsed:
    """``parse_batch`` for a body msgspec could not split."""
    try:
        batch = _BATCH.validate_json(body)
        if len(batch.reports) > max_reports:
            return _too_many(len(batch.reports), max_reports)
        return Parsed(reports=[_record(r) for r in batch.reports])
    except ValidationError:
        pass
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return _body_error(f"body is not valid JSON: {e}", "json_invalid")
    except RecursionError:
        return _body_error("body is not valid JSON for healthd: nested too deeply", "json_invalid")
    if not isinstance(data, dict):
        return _body_error("body must be a JSON object {\"schema_version\": 1, \"reports\": [...]}", "model_type")
    extra = sorted(set(data) - {"schema_version", "reports"})
    if extra:
        return _body_error(f"unknown field {extra[0]!r}", "extra_forbidden", [extra[0]])
    if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        return _body_error(f"unsupported schema_version {data.get('schema_version')!r}; this healthd speaks "
                           f"{SCHEMA_VERSION}", "schema_version", ["schema_version"])
    reports = data.get("reports")
    if not isinstance(reports, list):
        return _body_error("reports must be a list", "list_type", ["reports"])
    if len(reports) > max_reports:
        return _too_many(len(reports), max_reports)
    indices: list[int] = []
    out = Parsed(indices=indices)
    for i, raw in enumerate(reports):
        try:
            # Re-encode so the report is judged by exactly the JSON rules of the fast path.
            out.reports.append(_record(_REPORT.validate_json(json.dumps(raw))))
            indices.append(i)
        except ValidationError as e:
            out.rejected.append(_rejection(i, e))
    return out
