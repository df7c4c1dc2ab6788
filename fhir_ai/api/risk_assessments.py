"""RiskAssessment read and search from the local store."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, current_app, request

from .. import codes
from ..errors import BadRequest, NotFound
from ..pipeline import Pipeline
from .fhir_io import base_url, bundle, check_accept, check_id, fhir_response, lenient

bp = Blueprint("risk_assessments", __name__)

SEARCH_PARAMETERS = {"patient", "subject", "_count", "_offset", "_format"}
MAX_COUNT = 200
WRITE_BACK_EXTENSION = f"{codes.BASE}/StructureDefinition/write-back"


def _with_write_back(pipeline: Pipeline, resource: dict[str, Any]) -> dict[str, Any]:
    """Show whether the hospital's server has this assessment (computed, not part of what was sent)."""
    state = pipeline.store.write_back_state(resource["id"])
    if state is None:
        return resource
    parts: list[dict[str, Any]] = [{"url": "status", "valueCode": state["status"]},
                                   {"url": "attempts", "valueInteger": state["attempts"]}]
    if state["lastError"]:
        parts.append({"url": "lastError", "valueString": state["lastError"]})
    if state["deliveredAt"]:
        parts.append({"url": "deliveredAt", "valueDateTime": state["deliveredAt"]})
    out = dict(resource)
    out["extension"] = [*resource.get("extension", []), {"url": WRITE_BACK_EXTENSION, "extension": parts}]
    return out


@bp.get("/RiskAssessment/<resource_id>")
def read(resource_id: str):  # type: ignore[no-untyped-def]
    check_accept(request)
    check_id(resource_id, "RiskAssessment.id")
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    resource = pipeline.store.get_assessment(resource_id)
    if resource is None:
        raise NotFound(f"RiskAssessment/{resource_id} is not known here")
    return fhir_response(_with_write_back(pipeline, resource),
                         headers={"ETag": f'W/"{resource["meta"]["versionId"]}"',
                                  "Last-Modified": resource["meta"]["lastUpdated"]})


def _int(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"{name} must be a whole number", expression=name) from exc
    if not low <= value <= high:
        raise BadRequest(f"{name} must lie between {low} and {high}", expression=name)
    return value


def _patient_filter() -> str | None:
    values = []
    for name in ("patient", "subject"):
        for raw in request.args.getlist(name):
            value = raw.split("/_history", 1)[0]
            if "/" in value:
                kind, _, value = value.rpartition("/")
                if kind.rsplit("/", 1)[-1] != "Patient":
                    raise BadRequest(f"{name} must reference a Patient", expression=name)
            values.append(check_id(value, name))
    if len(set(values)) > 1:
        raise BadRequest("patient and subject name different patients", expression="patient")
    return values[0] if values else None


@bp.get("/RiskAssessment")
def search():  # type: ignore[no-untyped-def]
    check_accept(request)
    unknown = sorted(set(request.args) - SEARCH_PARAMETERS)
    if unknown and not lenient():
        raise BadRequest(f"unsupported search parameter(s) {unknown}; supported: {sorted(SEARCH_PARAMETERS)} "
                         "(send Prefer: handling=lenient to ignore them)", expression=unknown)
    count = _int("_count", 50, 0, MAX_COUNT)
    offset = _int("_offset", 0, 0, 10**9)
    patient = _patient_filter()
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    total, page = pipeline.store.search_assessments(patient=patient, count=count, offset=offset)
    base = base_url()
    query = {k: v for k, v in request.args.items() if k in SEARCH_PARAMETERS and k not in ("_offset",)}
    links = [{"relation": "self", "url": f"{base}/RiskAssessment?{urlencode({**query, '_offset': offset})}"}]
    if count and offset + count < total:
        links.append({"relation": "next",
                      "url": f"{base}/RiskAssessment?{urlencode({**query, '_offset': offset + count})}"})
    outcome = None
    if unknown:
        outcome = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "warning", "code": "not-supported",
            "diagnostics": f"ignored unsupported search parameter(s) {unknown}"}]}
    return fhir_response(bundle("searchset", page, base, total=total, links=links, outcome=outcome))
