"""Fuzz the HTTP API from its own OpenAPI document with schemathesis, against a real server (granian).

Every generated request, valid (positive) or not (negative), must get a documented
status and never a 5xx, and answers must match the documented schemas. The
operations are driven through hypothesis directly (``operation.as_strategy``):
schemathesis' pytest plugin does not load under pytest 9 (``'Function' object has
no attribute '_nodeid'``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from healthd.settings import Settings
from healthd.wire.openapi import openapi_document
from tests.live import LiveHealthd, live_healthd

# Caps high enough that generated job names never hit them: caps are tested in test_auth_and_limits.
_SETTINGS = Settings.from_mapping({"limits": {"max_jobs": 1_000_000, "max_layers_per_job": 1_000_000}})
_SCHEMA = schemathesis.openapi.from_dict(openapi_document())
_OPERATIONS = {op.ok().label: op.ok() for op in _SCHEMA.get_all_operations()}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveHealthd]:
    with live_healthd(_SETTINGS) as server:
        yield server


def test_the_served_document_is_the_one_fuzzed(live: LiveHealthd) -> None:
    assert live.get("/openapi.json").json() == openapi_document()
    assert set(_OPERATIONS) == {"POST /v1/reports", "GET /v1/alerts", "GET /v1/jobs", "GET /v1/jobs/{job}",
                                "GET /healthz", "GET /metrics"}


# Negative cases exist only for operations that take input.
_CASES = [(label, GenerationMode.POSITIVE) for label in sorted(_OPERATIONS)] + [
    (label, GenerationMode.NEGATIVE) for label in ("POST /v1/reports", "GET /v1/alerts")]


@pytest.mark.parametrize(("label", "mode"), _CASES, ids=[f"{lb}-{m.value}" for lb, m in _CASES])
def test_operation_conforms_to_the_document(live: LiveHealthd, label: str, mode: GenerationMode) -> None:
    operation = _OPERATIONS[label]
    examples = 40 if label == "POST /v1/reports" else 10

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=live.url)
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        # Not positive_data_acceptance: JSON Schema calls 7200.0 an integer, healthd's strict
        # pydantic types do not (a float step is a client bug worth a 422 naming the field).
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    check()
