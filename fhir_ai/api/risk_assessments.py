"""RiskAssessment read, vread, history (instance and type), search, withdrawal (entered-in-error)."""
from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, current_app, request

from .. import codes
from ..auth import guard
from ..auth.policy import requires
from ..errors import BadRequest, NotFound
from ..pipeline import Pipeline
from ..search.params import parse_history
from .fhir_io import base_url, check_accept, check_id, fhir_response, lenient, read_body, version_headers
from .search import WITHDRAW_DEFINITION, history_bundle, page_links, search_response

bp = Blueprint("risk_assessments", __name__)

WRITE_BACK_EXTENSION = f"{codes.BASE}/StructureDefinition/write-back"
_ETAG = re.compile(r'(?:W/)?"(\d+)"')


def _pipeline() -> Pipeline:
    return current_app.extensions["fhir_ai"]


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


def _answer(resource: dict[str, Any], with_state: bool = True):  # type: ignore[no-untyped-def]
    guard.note_entities(guard.entities_of([resource]))
    body = _with_write_back(_pipeline(), resource) if with_state else resource
    return fhir_response(body, headers=version_headers(resource))


@bp.get("/RiskAssessment/<resource_id>")
@requires("RiskAssessment", "r", audit="read")
def read(resource_id: str):  # type: ignore[no-untyped-def]
    check_accept(request)
    check_id(resource_id, "RiskAssessment.id")
    resource = _pipeline().store.get_assessment(resource_id)
    if resource is None:
        raise NotFound(f"RiskAssessment/{resource_id} is not known here")
    return _answer(resource)


@bp.get("/RiskAssessment/<resource_id>/_history/<version>")
@requires("RiskAssessment", "r", audit="vread")
def vread(resource_id: str, version: str):  # type: ignore[no-untyped-def]
    check_accept(request)
    check_id(resource_id, "RiskAssessment.id")
    if not (version.isascii() and version.isdigit()):
        raise BadRequest("the version must be a whole number", expression="versionId")
    number = int(version)
    # No version is that high (a database integer holds less): not found, not a failed query.
    resource = _pipeline().store.get_assessment_version(resource_id, number) if number < 2 ** 63 else None
    if resource is None:
        raise NotFound(f"RiskAssessment/{resource_id}/_history/{version} is not known here")
    return _answer(resource, with_state=False)


@bp.get("/RiskAssessment/<resource_id>/_history")
@requires("RiskAssessment", "r", audit="history-instance")
def history(resource_id: str):  # type: ignore[no-untyped-def]
    check_accept(request)
    check_id(resource_id, "RiskAssessment.id")
    versions = _pipeline().store.assessment_history(resource_id)
    if not versions:
        raise NotFound(f"RiskAssessment/{resource_id} is not known here")
    guard.note_entities(guard.entities_of(versions))
    return fhir_response(history_bundle(versions, "RiskAssessment"))


@bp.get("/RiskAssessment/_history")
@requires("RiskAssessment", "r", audit="history-type")
def history_type():  # type: ignore[no-untyped-def]
    """Every version of every assessment, newest first: ``_since``, ``_at``, ``_count``, paged by ``next``."""
    check_accept(request)
    query = parse_history(request.args.items(multi=True), lenient=lenient())
    page = _pipeline().store.history(query)
    guard.note_entities(guard.entities_of(page.resources))
    links = page_links(f"{base_url()}/RiskAssessment/_history", query.echo, query.cursor, page.next_cursor)
    return fhir_response(history_bundle(page.resources, "RiskAssessment", total=page.total, links=links))


@bp.get("/RiskAssessment")
@requires("RiskAssessment", "s", audit="search-type")
def search():  # type: ignore[no-untyped-def]
    return search_response("RiskAssessment")


@bp.get("/OperationDefinition/withdraw")
def withdraw_definition():  # type: ignore[no-untyped-def]
    return fhir_response({
        "resourceType": "OperationDefinition", "id": "withdraw", "url": WITHDRAW_DEFINITION,
        "name": "Withdraw", "status": "active", "kind": "operation", "code": "withdraw",
        "description": ("Mark a stored RiskAssessment entered-in-error as a new version (the old one stays "
                        "readable), audited, and queue its write-back. If-Match: W/\"n\" guards against "
                        "withdrawing a newer version."),
        "resource": ["RiskAssessment"], "system": False, "type": False, "instance": True, "affectsState": True,
        "parameter": [
            {"name": "reason", "use": "in", "min": 1, "max": "1", "type": "string",
             "documentation": "Why it is withdrawn (kept in a note and in the Provenance)."},
            {"name": "return", "use": "out", "min": 1, "max": "1", "type": "RiskAssessment",
             "documentation": "The new version."},
        ],
    })


@bp.post("/RiskAssessment/<resource_id>/$withdraw")
@requires("RiskAssessment", "u", audit="update", audit_failures_only=True)
def withdraw(resource_id: str):  # type: ignore[no-untyped-def]
    """Mark an assessment entered-in-error (a new version; the old one stays readable). Parameters:
    ``reason`` (string, required). ``If-Match: W/"n"`` guards against withdrawing a newer version."""
    check_accept(request)
    check_id(resource_id, "RiskAssessment.id")
    body = read_body("Parameters")
    assert body is not None
    reasons = [p.get("valueString") for p in body.get("parameter") or [] if p.get("name") == "reason"]
    if len(reasons) != 1 or not isinstance(reasons[0], str) or not reasons[0].strip():
        raise BadRequest("$withdraw needs exactly one 'reason' (valueString)", expression="Parameters.parameter")
    expected = None
    if request.headers.get("If-Match"):
        match = _ETAG.fullmatch(request.headers["If-Match"].strip())
        if not match:
            raise BadRequest('If-Match must be W/"<version>"', expression="If-Match")
        expected = int(match.group(1))
    saved = _pipeline().store.withdraw_assessment(resource_id, reason=reasons[0].strip()[:1000],
                                                  expected_version=expected)
    return fhir_response(saved.resource, headers=version_headers(saved.resource))
