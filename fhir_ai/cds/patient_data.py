"""Check resources an EHR sends (push Bundle, CDS prefetch) form one patient's record; name the bad path."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..errors import BadRequest
from ..fhir.ids import ID, usable_id

ACCEPTED_TYPES = ("Patient", "Encounter", "Observation")
OBSERVATION_STATUSES = {"registered", "preliminary", "final", "amended", "corrected", "cancelled",
                        "entered-in-error", "unknown"}


@dataclass
class PatientData:
    """The checked resources (references to the patient normalised to Patient/{id}) and what was skipped."""
    patient_id: str
    resources: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)      # FHIRPaths of ignored entries (lenient mode)


def fhir_path(base: str, loc: tuple[Any, ...]) -> str:
    out = base
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate_structure(resource: dict[str, Any], path: str) -> None:
    """fhir.resources (R4B models read R4 JSON for these types) plus the status rules it leaves out."""
    from fhir.resources.R4B import get_fhir_model_class
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BadRequest(f"invalid {resource['resourceType']}: {first['msg']}",
                         expression=fhir_path(path, tuple(first["loc"]))) from None
    if resource["resourceType"] == "Observation" and resource.get("status") not in OBSERVATION_STATUSES:
        raise BadRequest("Observation.status must be one of " + ", ".join(sorted(OBSERVATION_STATUSES)),
                         expression=f"{path}.status")


class RecordChecker:
    """Collects (path, resource) pairs for one patient and refuses anything that is not theirs."""

    def __init__(self, patient_id: str, patient_urls: set[str] | None = None, *, lenient: bool = False) -> None:
        self.data = PatientData(check_id(patient_id, "patientId"))
        self.lenient = lenient
        self._aliases = {f"Patient/{patient_id}", *(patient_urls or set())}
        self._seen: dict[tuple[str, str], str] = {}

    def add(self, resource: Any, path: str) -> None:
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise BadRequest("not a FHIR resource", expression=path)
        kind = resource["resourceType"]
        if kind not in ACCEPTED_TYPES:
            if self.lenient:
                self.data.skipped.append(path)
                return
            raise BadRequest(f"{kind} is not used here; send only {', '.join(ACCEPTED_TYPES)} "
                             "(or Prefer: handling=lenient to skip others)", expression=f"{path}.resourceType")
        rid = resource.get("id")
        if not isinstance(rid, str) or not ID.fullmatch(rid):
            raise BadRequest(f"{kind} needs an id (1-64 of A-Z a-z 0-9 - .): assessments cite their inputs by id",
                             expression=f"{path}.id")
        if (kind, rid) in self._seen:
            raise BadRequest(f"{kind}/{rid} appears twice (also at {self._seen[(kind, rid)]})", expression=path)
        self._seen[(kind, rid)] = path
        validate_structure(resource, path)
        out = dict(resource)
        if kind == "Patient":
            if rid != self.data.patient_id:
                raise BadRequest(f"Patient/{rid} is not the patient being assessed "
                                 f"(Patient/{self.data.patient_id})", expression=f"{path}.id")
        else:
            subject = resource.get("subject")
            reference = subject.get("reference") if isinstance(subject, dict) else None
            if not reference:
                raise BadRequest(f"{kind}.subject must reference the patient", expression=f"{path}.subject")
            if not self._is_patient(reference):
                raise BadRequest(f"{kind}/{rid} belongs to another patient ({reference}); only "
                                 f"Patient/{self.data.patient_id}'s data may be sent", expression=f"{path}.subject")
            out["subject"] = {**subject, "reference": f"Patient/{self.data.patient_id}"}
        self.data.resources.append(out)

    def _is_patient(self, reference: str) -> bool:
        reference = reference.split("/_history", 1)[0]
        if reference in self._aliases:
            return True
        # An absolute reference to the same patient on the EHR's server: ".../Patient/{id}".
        return "://" in reference and reference.endswith(f"/Patient/{self.data.patient_id}")


def check_id(value: Any, expression: str) -> str:
    if not usable_id(value):
        raise BadRequest("not a FHIR id (1-64 of A-Z a-z 0-9 - .; not dots only, a path segment)",
                         expression=expression)
    return value
