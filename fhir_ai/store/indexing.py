"""What each stored resource contributes to the search index: (param, system, code, number) rows."""
from __future__ import annotations

from typing import Any, Iterator

Entry = tuple[str, str | None, str | None, float | None]


def split_reference(reference: str) -> tuple[str | None, str] | None:
    """'Patient/1', 'https://h/fhir/Patient/1' or 'Patient/1/_history/2' → ('Patient', '1'); '#x' → None."""
    if not reference or reference.startswith("#"):
        return None
    value = reference.split("/_history/", 1)[0].rstrip("/")
    parts = value.split("/")
    if len(parts) >= 2:
        return parts[-2], parts[-1]
    return None, parts[0]


def _reference(param: str, ref: dict[str, Any] | None) -> Iterator[Entry]:
    if not isinstance(ref, dict):
        return
    parsed = split_reference(ref.get("reference") or "")
    if parsed:
        yield param, parsed[0], parsed[1], None
    identifier = ref.get("identifier")
    if isinstance(identifier, dict) and identifier.get("value"):
        yield f"{param}:identifier", identifier.get("system"), identifier["value"], None


def _codings(param: str, concept: dict[str, Any] | None) -> Iterator[Entry]:
    for coding in (concept or {}).get("coding") or []:
        if coding.get("code"):
            yield param, coding.get("system"), coding["code"], None


def risk_assessment(resource: dict[str, Any]) -> list[Entry]:
    out: list[Entry] = []
    for identifier in resource.get("identifier") or []:
        out.append(("identifier", identifier.get("system"), identifier.get("value"), None))
    out += _codings("method", resource.get("method"))
    out += _reference("subject", resource.get("subject"))
    out += _reference("encounter", resource.get("encounter"))
    out += _reference("condition", resource.get("condition"))
    out += _reference("performer", resource.get("performer"))
    for prediction in resource.get("prediction") or []:
        out += _codings("risk", prediction.get("qualitativeRisk"))
        if isinstance(prediction.get("probabilityDecimal"), (int, float)):
            out.append(("probability", None, None, float(prediction["probabilityDecimal"])))
    return out


def provenance(resource: dict[str, Any], patient_id: str | None) -> list[Entry]:
    out: list[Entry] = []
    for target in resource.get("target") or []:
        out += _reference("target", target)
    for agent in resource.get("agent") or []:
        out += _reference("agent", agent.get("who"))
    for entity in resource.get("entity") or []:
        out += _reference("entity", entity.get("what"))
    if patient_id:
        out.append(("patient", "Patient", patient_id, None))
    return out


def audit_event(resource: dict[str, Any]) -> list[Entry]:
    out: list[Entry] = [("action", "http://hl7.org/fhir/audit-event-action", resource.get("action"), None),
                        ("outcome", "http://hl7.org/fhir/audit-event-outcome", resource.get("outcome"), None)]
    out += [("type",) + entry[1:] for entry in _codings("type", {"coding": [resource.get("type") or {}]})]
    out += [("subtype",) + entry[1:] for entry in _codings("subtype", {"coding": resource.get("subtype") or []})]
    for agent in resource.get("agent") or []:
        who = agent.get("who") or {}
        out += _reference("agent", who)
        identifier = who.get("identifier") or {}
        if identifier.get("value"):     # a plain agent=<client id> finds the client too
            out.append(("agent", None, identifier["value"], None))
        address = (agent.get("network") or {}).get("address")
        if address:
            out.append(("address", None, address, None))
    for entity in resource.get("entity") or []:
        out += _reference("entity", entity.get("what"))
        parsed = split_reference((entity.get("what") or {}).get("reference") or "")
        if parsed and parsed[0] == "Patient":
            out.append(("patient", "Patient", parsed[1], None))
    return [entry for entry in out if entry[2] is not None or entry[3] is not None]
