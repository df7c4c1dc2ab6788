"""The $assess operation: POST /Patient/{id}/$assess with an optional Parameters body."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flask import Blueprint, current_app, request

from ..errors import BadRequest
from ..fhir import times
from ..pipeline import Pipeline
from .fhir_io import ID, base_url, bundle, check_accept, check_id, fhir_response, lenient, read_body

bp = Blueprint("operations", __name__)

PARAMETERS = {"model": ("valueCode", "valueString"), "writeBack": ("valueBoolean",),
              "asOf": ("valueDateTime", "valueInstant"),
              "encounter": ("valueReference", "valueString", "valueId")}


@dataclass
class AssessRequest:
    models: list[str] = field(default_factory=list)
    write_back: bool | None = None
    as_of: datetime | None = None
    encounter: str | None = None


def parse_parameters(body: dict[str, Any] | None, *, strict: bool = True) -> AssessRequest:
    """Read $assess Parameters; every problem names its FHIRPath."""
    out = AssessRequest()
    if body is None:
        return out
    parameters = body.get("parameter", [])
    if not isinstance(parameters, list):
        raise BadRequest("Parameters.parameter must be a list", expression="Parameters.parameter")
    for i, param in enumerate(parameters):
        where = f"Parameters.parameter[{i}]"
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            raise BadRequest("each parameter needs a name", expression=f"{where}.name")
        name = param["name"]
        if name not in PARAMETERS:
            if strict:
                raise BadRequest(f"unknown parameter {name!r}; $assess takes {sorted(PARAMETERS)}",
                                 expression=f"{where}.name")
            continue
        values = [key for key in param if key.startswith("value")]
        allowed = PARAMETERS[name]
        if len(values) != 1 or values[0] not in allowed:
            raise BadRequest(f"parameter {name!r} needs exactly one of {list(allowed)}", expression=where)
        value = param[values[0]]
        path = f"{where}.{values[0]}"
        if name == "model":
            if not isinstance(value, str) or not value:
                raise BadRequest("model must be a non-empty code", expression=path)
            out.models.append(value)
        elif name == "writeBack":
            if not isinstance(value, bool):
                raise BadRequest("writeBack must be true or false", expression=path)
            if out.write_back is not None:
                raise BadRequest("writeBack given twice", expression=where)
            out.write_back = value
        elif name == "asOf":
            if out.as_of is not None:
                raise BadRequest("asOf given twice", expression=where)
            if not isinstance(value, str) or len(value) < 10:
                raise BadRequest("asOf must be a FHIR dateTime with a date", expression=path)
            try:
                out.as_of = times.parse_datetime(value)
            except ValueError as exc:
                raise BadRequest(f"asOf: {exc}", expression=path) from exc
        elif name == "encounter":
            if out.encounter is not None:
                raise BadRequest("encounter given twice", expression=where)
            reference = value.get("reference") if isinstance(value, dict) else value
            if not isinstance(reference, str):
                raise BadRequest("encounter must reference an Encounter", expression=path)
            kind, _, ident = reference.rpartition("/")
            if kind not in ("", "Encounter") or not ID.fullmatch(ident):
                raise BadRequest("encounter must be 'Encounter/<id>'", expression=path)
            out.encounter = ident
    return out


@bp.post("/Patient/<patient_id>/$assess")
def assess(patient_id: str):  # type: ignore[no-untyped-def]
    check_accept(request)
    check_id(patient_id, "Patient.id")
    params = parse_parameters(read_body("Parameters", optional=True), strict=not lenient())
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    for model_id in params.models:
        pipeline.registry.get(model_id)   # unknown model → 400 before anything is fetched
    result = pipeline.assess(patient_id, models=params.models or None, as_of=params.as_of,
                             write_back=params.write_back, encounter=params.encounter)
    outcome = {"resourceType": "OperationOutcome", "issue": result.issues} if result.issues else None
    return fhir_response(bundle("collection", result.resources, base_url(), outcome=outcome,
                                 texts=result.texts))
