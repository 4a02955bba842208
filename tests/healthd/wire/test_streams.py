"""The stream name on the wire: bounded, validated alike by the fast decoder and by pydantic."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from healthd.wire.parse import parse_batch
from healthd.wire.records import NameCheck, StepRecord
from healthd.wire.schema import AttachReport


def _body(*reports: dict) -> bytes:
    return json.dumps({"schema_version": 1, "reports": list(reports)}).encode()


def test_a_named_step_keeps_its_stream_and_an_unnamed_one_has_none() -> None:
    parsed = parse_batch(_body({"kind": "step", "job": "gan", "stream": "generator", "time": 1, "step": 0},
                               {"kind": "step", "job": "gan", "time": 1, "step": 0}), 100, NameCheck())
    assert not parsed.rejected
    assert [r.stream for r in parsed.reports] == ["generator", None]
    assert all(isinstance(r, StepRecord) for r in parsed.reports)


@pytest.mark.parametrize("stream", ["Generator", "a b", "x" * 33, "", "g\n", "gen/1"])
@pytest.mark.parametrize("kind", ["step", "heartbeat"])
def test_a_stream_that_is_not_a_short_identifier_is_refused_naming_the_field(stream: str, kind: str) -> None:
    parsed = parse_batch(_body({"kind": kind, "job": "gan", "stream": stream, "time": 1, "step": 0}), 100,
                         NameCheck())
    assert not parsed.reports
    (rejection,) = parsed.rejected
    assert rejection.errors[0].loc[-1] == "stream", rejection


def test_loss_kind_and_monitor_id_travel_in_the_attach_report() -> None:
    a = AttachReport.model_validate({"job": "gan", "stream": "discriminator", "time": 1.0, "monitor_id": "abc123",
                                     "hints": {"loss_kind": "adversarial"}})
    assert a.hints.loss_kind == "adversarial" and AttachReport(job="gan", time=1.0).hints.loss_kind == "minimized"
    with pytest.raises(ValidationError):
        AttachReport.model_validate({"job": "gan", "time": 1.0, "hints": {"loss_kind": "maximized"}})
