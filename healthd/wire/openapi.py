"""The OpenAPI 3.1 document of healthd's HTTP API (``GET /openapi.json``), written from the wire models.

The request and response bodies are the pydantic models of ``healthd.wire.schema``
(``ReportBatch.model_json_schema()`` and friends), so the document cannot drift
from what the server validates. Error answers are documented per status:
400 for a body that is not JSON, 401 for a missing or
wrong bearer token, 413 for a body or batch over the limits, 422 naming the
field at fault of each rejected report (the valid ones are kept).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from healthd.wire.schema import JOB_HEADER, SCHEMA_VERSION, AlertOut, AlertState, IngestResult, ReportBatch

_REF = "#/components/schemas/{model}"


def _schema(model: type[BaseModel], schemas: dict[str, Any], mode: JsonSchemaMode) -> dict[str, str]:
    doc = model.model_json_schema(ref_template=_REF, mode=mode)
    schemas.update(doc.pop("$defs", {}))
    schemas[model.__name__] = doc
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document() -> dict[str, Any]:
    """The API description; pure (a fresh dict on every call)."""
    schemas: dict[str, Any] = {}
    batch = _schema(ReportBatch, schemas, "validation")
    for name in ("StepReport", "EvalReport", "HeartbeatReport", "AttachReport", "GpuReport"):
        # ``kind`` has a default in the models but is the union's discriminator: a report must carry it.
        schemas[name].setdefault("required", []).append("kind")
    result = _schema(IngestResult, schemas, "serialization")
    alert = _schema(AlertOut, schemas, "serialization")
    error = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    schemas["Error"] = error
    err_ref = {"$ref": _REF.format(model="Error")}
    unauthorized = _json(err_ref, "missing or wrong bearer token (only when auth.token is set)")
    job_summary = {"type": "object", "properties": {"job": {"type": "string"}}, "required": ["job"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "healthd", "version": f"{SCHEMA_VERSION}",
                 "description": "Training-health service: report ingest and alert read API."},
        "paths": {
            "/v1/reports": {"post": {
                "summary": "Ingest a batch of reports",
                "parameters": [{"name": JOB_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                                "description": "the job of every report in the body, for a proxy that shards by "
                                               "job; when sent, a report of another job refuses the batch (400)"}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": batch}}},
                "responses": {
                    "200": _json(result, "all reports accepted"),
                    "400": _json(result, "the body is not JSON (or not UTF-8), or a report's job is not "
                                         f"the {JOB_HEADER} header's (nothing applied)"),
                    "401": unauthorized,
                    "413": _json(result, "body over limits.max_body_bytes or more reports than "
                                         "limits.max_reports_per_request"),
                    "422": _json(result, "some reports rejected, each with the field at fault (schema or "
                                         "a cardinality cap); the others were accepted"),
                },
            }},
            "/v1/alerts": {"get": {
                "summary": "Alerts, resolved ones included",
                "parameters": [
                    {"name": "job", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "state", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": [s.value for s in AlertState]}},
                ],
                "responses": {
                    "200": _json({"type": "object", "properties": {"alerts": {"type": "array", "items": alert}},
                                  "required": ["alerts"]}, "alerts, oldest first"),
                    "400": _json(err_ref, "unknown state"),
                    "401": unauthorized,
                },
            }},
            "/v1/jobs": {"get": {
                "summary": "Jobs healthd tracks",
                "responses": {
                    "200": _json({"type": "object", "properties": {"jobs": {"type": "array", "items": job_summary}},
                                  "required": ["jobs"]}, "one summary per job"),
                    "401": unauthorized,
                },
            }},
            "/v1/jobs/{job}": {"get": {
                "summary": "One job",
                "parameters": [{"name": "job", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": _json(job_summary, "the job's summary and attach report"),
                    "401": unauthorized,
                    "404": _json(err_ref, "no such job"),
                },
            }},
            "/healthz": {"get": {
                "summary": "Liveness",
                "responses": {"200": _json({"type": "object"}, "alive"), "401": unauthorized},
            }},
            "/metrics": {"get": {
                "summary": "Prometheus exposition",
                "responses": {"200": {"description": "text exposition format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              "401": unauthorized},
            }},
        },
        "components": {"schemas": schemas},
    }
