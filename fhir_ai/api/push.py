"""Push mode: POST /$assess with a Parameters holding a Bundle (Patient, Encounter, Observations).

Nothing is pulled from the hospital: the EHR sends the data. Scoring, storage, write-back and the
answer are those of POST /Patient/{id}/$assess.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from flask import Blueprint, current_app, request

from .. import codes
from ..cds.patient_data import RecordChecker, check_id
from ..errors import BadRequest
from ..pipeline import Pipeline, warning
from .fhir_io import base_url, bundle, check_accept, fhir_response, lenient, read_body
from .operations import parse_parameters

log = logging.getLogger(__name__)

bp = Blueprint("push", __name__)

BUNDLE_PARAMETER = "bundle"
BUNDLE_TYPES = {"collection", "searchset", "transaction", "batch"}
PUSH_DEFINITION = f"{codes.BASE}/OperationDefinition/assess-bundle"


def operation_definition() -> dict[str, Any]:
    return {
        "resourceType": "OperationDefinition", "id": "assess-bundle", "url": PUSH_DEFINITION,
        "name": "AssessBundle", "status": "active", "kind": "operation", "code": "assess",
        "description": ("Push mode: assess one patient from the resources in the Bundle (exactly one Patient, its "
                        "Encounters and Observations); nothing is pulled from the hospital. Scoring, storage, "
                        "write-back and the answer are those of Patient/[id]/$assess."),
        "system": True, "type": False, "instance": False, "affectsState": True,
        "parameter": [
            {"name": BUNDLE_PARAMETER, "use": "in", "min": 1, "max": "1", "type": "Bundle",
             "documentation": "collection, searchset, transaction or batch; every resource needs an id and its "
                              "subject must be the Patient (Patient/[id], or the Patient entry's fullUrl)."},
            {"name": "model", "use": "in", "min": 0, "max": "*", "type": "code"},
            {"name": "writeBack", "use": "in", "min": 0, "max": "1", "type": "boolean"},
            {"name": "asOf", "use": "in", "min": 0, "max": "1", "type": "dateTime"},
            {"name": "return", "use": "out", "min": 1, "max": "1", "type": "Bundle",
             "documentation": "As Patient/[id]/$assess: a collection Bundle of RiskAssessments and warnings."},
        ],
    }


def capability_additions(statement: dict[str, Any]) -> None:
    """What push mode and CDS Hooks add to the CapabilityStatement (called by api/metadata.py)."""
    rest = statement["rest"][0]
    rest.setdefault("operation", []).append({"name": "assess", "definition": PUSH_DEFINITION})
    note = ("Push mode: POST [base]/$assess with a Bundle. CDS Hooks 2.0: discovery at [base]/cds-services, "
            "services at [base]/cds-services/{id} and feedback at [base]/cds-services/{id}/feedback "
            "(the EHR's JWT, RS384 or ES384).")
    rest["documentation"] = f"{rest['documentation']} {note}" if rest.get("documentation") else note


def split_parameters(body: dict[str, Any]) -> tuple[tuple[int, dict[str, Any]], dict[str, Any]]:
    """((index, Bundle), the other parameters) — exactly one 'bundle' parameter with a Bundle resource."""
    parameters = body.get("parameter")
    if not isinstance(parameters, list):
        raise BadRequest("Parameters.parameter must be a list", expression="Parameters.parameter")
    found = [(i, p) for i, p in enumerate(parameters) if isinstance(p, dict) and p.get("name") == BUNDLE_PARAMETER]
    if len(found) != 1:
        raise BadRequest(f"push mode needs exactly one '{BUNDLE_PARAMETER}' parameter holding a Bundle "
                         f"(found {len(found)})", expression="Parameters.parameter")
    index, parameter = found[0]
    resource = parameter.get("resource")
    where = f"Parameters.parameter[{index}]"
    if not isinstance(resource, dict) or resource.get("resourceType") != "Bundle":
        raise BadRequest("the bundle parameter must carry a Bundle in 'resource'", expression=f"{where}.resource")
    if set(parameter) - {"name", "resource"}:
        raise BadRequest("the bundle parameter takes only 'resource'", expression=where)
    rest = dict(body)
    rest["parameter"] = [p for i, p in enumerate(parameters) if i != index]
    return (index, resource), rest


def check_bundle(index: int, resource: dict[str, Any], *, lenient_mode: bool) -> tuple[str, list[dict[str, Any]],
                                                                                         list[str]]:
    """(patient id, that patient's resources, skipped paths); BadRequest names the offending path."""
    where = f"Parameters.parameter[{index}].resource"
    if not isinstance(resource.get("type"), str) or resource["type"] not in BUNDLE_TYPES:
        raise BadRequest(f"Bundle.type must be one of {sorted(BUNDLE_TYPES)}", expression=f"{where}.type")
    entries = resource.get("entry")
    if not isinstance(entries, list) or not entries:
        raise BadRequest("the Bundle has no entries", expression=f"{where}.entry")
    patients = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            raise BadRequest("each entry needs a resource", expression=f"{where}.entry[{i}].resource")
        if entry["resource"].get("resourceType") == "Patient":
            patients.append((i, entry))
    if len(patients) != 1:
        raise BadRequest(f"the Bundle must hold exactly one Patient (found {len(patients)})",
                         expression=f"{where}.entry" if not patients else f"{where}.entry[{patients[1][0]}].resource")
    i, entry = patients[0]
    patient_id = check_id(entry["resource"].get("id"), f"{where}.entry[{i}].resource.id")
    # Entries may point at the Patient through its fullUrl (urn:uuid:… or absolute), as in a transaction.
    aliases = {entry["fullUrl"]} if isinstance(entry.get("fullUrl"), str) else set()
    checker = RecordChecker(patient_id, aliases, lenient=lenient_mode)
    for i, entry in enumerate(entries):
        checker.add(entry["resource"], f"{where}.entry[{i}].resource")
    return patient_id, checker.data.resources, checker.data.skipped


@bp.get("/OperationDefinition/assess-bundle")
def push_definition():  # type: ignore[no-untyped-def]
    return fhir_response(operation_definition())


def _original_index(expression: str, removed: int) -> str:
    match = re.match(r"Parameters\.parameter\[(\d+)\](.*)", expression)
    if not match:
        return expression
    k = int(match.group(1))
    return f"Parameters.parameter[{k + 1 if k >= removed else k}]{match.group(2)}"


@bp.post("/$assess")
def assess_pushed():  # type: ignore[no-untyped-def]
    check_accept(request)
    body = read_body("Parameters")
    assert body is not None
    (index, resource), rest = split_parameters(body)
    try:
        params = parse_parameters(rest, strict=not lenient())
    except BadRequest as exc:
        # parse_parameters counted without the bundle parameter: name the caller's own index.
        exc.expression = [_original_index(e, index) for e in exc.expression]
        raise
    patient_id, resources, skipped = check_bundle(index, resource, lenient_mode=lenient())
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    for model_id in params.models:
        pipeline.registry.get(model_id)   # unknown model → 400 before anything is scored
    result = pipeline.assess(patient_id, models=params.models or None, as_of=params.as_of,
                             write_back=params.write_back, resources=resources)
    issues = list(result.issues)
    if skipped:
        issues.append(warning("not-supported", f"{len(skipped)} entr(ies) of other resource types ignored",
                              skipped[0]))
    log.info("push $assess for patient %s: %d resource(s) received", patient_id, len(resources))
    outcome = {"resourceType": "OperationOutcome", "issue": issues} if issues else None
    return fhir_response(bundle("collection", result.resources, base_url(), outcome=outcome,
                                 texts=result.texts))
