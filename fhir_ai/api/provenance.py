"""Provenance read and search (``GET /Provenance?target=RiskAssessment/{id}``)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request

from ..auth import guard
from ..auth.policy import requires
from ..errors import NotFound
from ..store.audit import Entity
from .fhir_io import check_accept, check_id, fhir_response, version_headers
from .search import search_response

bp = Blueprint("provenance", __name__)


@bp.get("/Provenance/<resource_id>")
@requires("Provenance", "r", audit="read")
def read(resource_id: str):  # type: ignore[no-untyped-def]
    check_accept(request)
    check_id(resource_id, "Provenance.id")
    resource = current_app.extensions["fhir_ai"].store.get_provenance(resource_id)
    if resource is None:
        raise NotFound(f"Provenance/{resource_id} is not known here")
    guard.note_entities(guard.entities_of([resource]) + patients_of([resource]))
    return fhir_response(resource, headers=version_headers(resource))


@bp.get("/Provenance")
@requires("Provenance", "s", audit="search-type")
def search():  # type: ignore[no-untyped-def]
    return search_response("Provenance", entities=patients_of)


def patients_of(resources: list[dict[str, Any]]) -> list[Entity]:
    """The patients whose assessments these Provenance are about, for the read's AuditEvent (so that
    ``AuditEvent?patient=`` finds who read a patient's Provenance)."""
    store = current_app.extensions["fhir_ai"].store
    return [Entity(f"Patient/{p}") for p in store.provenance_patients([r["id"] for r in resources])]
