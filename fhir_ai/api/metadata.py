"""GET /metadata (CapabilityStatement) and the OperationDefinition of $assess: what we truly support."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app

from .. import __version__, codes
from ..pipeline import Pipeline
from . import search
from .fhir_io import base_url, fhir_response

bp = Blueprint("metadata", __name__)

ASSESS_DEFINITION = f"{codes.BASE}/OperationDefinition/assess"


def assess_parameters(models: list[str], as_of: str = "Assess as of this time (default: now); later data is "
                                                      "ignored.") -> list[dict[str, Any]]:
    """The in-parameters every $assess variant shares: model, writeBack, asOf."""
    return [
        {"name": "model", "use": "in", "min": 0, "max": "*", "type": "code",
         "documentation": f"Model id; default deterioration. Available: {', '.join(models)}"},
        {"name": "writeBack", "use": "in", "min": 0, "max": "1", "type": "boolean",
         "documentation": "Write the assessment to the hospital's server (default: FHIR_AI_WRITE_BACK)."},
        {"name": "asOf", "use": "in", "min": 0, "max": "1", "type": "dateTime", "documentation": as_of},
    ]


def operation_definition(models: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "OperationDefinition", "id": "assess", "url": ASSESS_DEFINITION,
        "name": "Assess", "status": "active", "kind": "operation", "code": "assess",
        "description": ("Pull the patient's data from the hospital's FHIR server, score it with the chosen "
                        "model(s), store the RiskAssessment(s) and write them back. Repeating a request with "
                        "the same inputs returns the stored assessment instead of a duplicate."),
        "resource": ["Patient"], "system": False, "type": False, "instance": True, "affectsState": True,
        "parameter": [
            *assess_parameters(models),
            {"name": "encounter", "use": "in", "min": 0, "max": "1", "type": "Reference",
             "documentation": "The visit to assess (e.g. the ED encounter being triaged); default: the "
                              "patient's current encounter."},
            {"name": "return", "use": "out", "min": 1, "max": "1", "type": "Bundle",
             "documentation": "A collection Bundle of RiskAssessments (the model's and NEWS2) and an "
                              "OperationOutcome with warnings, if any."},
        ],
    }


@bp.get("/metadata")
def capability_statement():  # type: ignore[no-untyped-def]
    statement = {
        "resourceType": "CapabilityStatement", "status": "active", "date": "2026-11-25", "kind": "instance",
        "software": {"name": "fhir_ai", "version": __version__},
        "implementation": {"description": "fhir_ai risk assessment service", "url": base_url()},
        "fhirVersion": "4.0.1", "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server", "security": search.SECURITY,
            "resource": [
                {"type": "Patient", "operation": [{"name": "assess", "definition": ASSESS_DEFINITION}]},
                *search.capability_resources(),     # RiskAssessment, Provenance, AuditEvent
                {"type": "OperationDefinition", "interaction": [{"code": "read"}]},
            ],
        }],
    }
    from .push import capability_additions   # push mode and CDS Hooks (issue 5), kept in one place
    capability_additions(statement)
    from .jobs import capability_additions as batch_additions   # batch jobs, Subscriptions
    batch_additions(statement)
    return fhir_response(statement)


@bp.get("/OperationDefinition/assess")
def assess_definition():  # type: ignore[no-untyped-def]
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    return fhir_response(operation_definition(sorted(pipeline.registry.models)))
