"""What each stored resource contributes to the search index: (param, system, code, number) rows.

Every $assess indexes two Provenance with one entity per basis reference (~50 each), so the rows are
built in one pass with plain appends (no generators, one string split per reference); those entity
references are keys of their own table (trail_tables.ProvenanceEntityRow), not search index rows.
"""
from __future__ import annotations

from typing import Any

Entry = tuple[str, str | None, str | None, float | None]
EntityKey = tuple[str, str]          # a Provenance entity reference: (id, type or '')
# provenance_entity's column widths: keys are cut to them before they are made distinct (PostgreSQL's casts
# would cut them anyway, and two references alike up to there would break its primary key). A FHIR id is
# at most 64 characters, so a longer one cannot be searched for anyway.
ID_WIDTH, TYPE_WIDTH = 512, 64

_ACTION = "http://hl7.org/fhir/audit-event-action"
_OUTCOME = "http://hl7.org/fhir/audit-event-outcome"


def split_reference(reference: str) -> tuple[str | None, str] | None:
    """'Patient/1', 'https://h/fhir/Patient/1' or 'Patient/1/_history/2' → ('Patient', '1'); '#x' → None."""
    if not reference or reference[0] == "#":
        return None
    if "/_history/" in reference:
        reference = reference.split("/_history/", 1)[0]
    if reference[-1:] == "/":
        reference = reference.rstrip("/")
    head, slash, last = reference.rpartition("/")
    if not slash:
        return None, last
    return head.rpartition("/")[2], last


def _reference(out: list[Entry], param: str, ref: Any) -> None:
    """Append the rows of one Reference: its (type, id) and its logical identifier (``param:identifier``)."""
    if not isinstance(ref, dict):
        return
    reference = ref.get("reference")
    if reference:
        parsed = split_reference(reference)
        if parsed:
            out.append((param, parsed[0], parsed[1], None))
    identifier = ref.get("identifier")
    if isinstance(identifier, dict) and identifier.get("value"):
        out.append((param + ":identifier", identifier.get("system"), identifier["value"], None))


def _codings(out: list[Entry], param: str, codings: Any) -> None:
    for coding in codings or ():
        if coding.get("code"):
            out.append((param, coding.get("system"), coding["code"], None))


def risk_assessment(resource: dict[str, Any]) -> list[Entry]:
    out: list[Entry] = []
    for identifier in resource.get("identifier") or ():
        out.append(("identifier", identifier.get("system"), identifier.get("value"), None))
    _codings(out, "method", (resource.get("method") or {}).get("coding"))
    _reference(out, "subject", resource.get("subject"))
    _reference(out, "encounter", resource.get("encounter"))
    _reference(out, "condition", resource.get("condition"))
    _reference(out, "performer", resource.get("performer"))
    for prediction in resource.get("prediction") or ():
        _codings(out, "risk", (prediction.get("qualitativeRisk") or {}).get("coding"))
        if isinstance(prediction.get("probabilityDecimal"), (int, float)):
            out.append(("probability", None, None, float(prediction["probabilityDecimal"])))
    return out


def provenance(resource: dict[str, Any], patient_id: str | None) -> tuple[list[Entry], list[EntityKey]]:
    """(search index rows, entity keys): ``entity`` references go to provenance_entity as (id, type) keys,
    distinct, type '' where the reference names none; everything else (``entity:identifier`` too) is rows."""
    out: list[Entry] = []
    keys: dict[EntityKey, None] = {}
    for target in resource.get("target") or ():
        _reference(out, "target", target)
    for agent in resource.get("agent") or ():
        _reference(out, "agent", agent.get("who"))
    for entity in resource.get("entity") or ():
        what = entity.get("what")
        if what.__class__ is not dict:
            continue
        reference = what.get("reference")
        if reference:
            # the common case, a basis reference 'Type/id' alone: split inline (as split_reference would)
            if reference[0] != "#" and reference[-1] != "/" and "/_history/" not in reference:
                head, slash, last = reference.rpartition("/")
                keys[(last[:ID_WIDTH], head.rpartition("/")[2][:TYPE_WIDTH] if slash else "")] = None
            else:
                parsed = split_reference(reference)
                if parsed:
                    keys[(parsed[1][:ID_WIDTH], (parsed[0] or "")[:TYPE_WIDTH])] = None
        identifier = what.get("identifier")
        if isinstance(identifier, dict) and identifier.get("value"):
            out.append(("entity:identifier", identifier.get("system"), identifier["value"], None))
    if patient_id:
        out.append(("patient", "Patient", patient_id, None))
    return out, list(keys)


def audit_event(resource: dict[str, Any]) -> list[Entry]:
    out: list[Entry] = []
    if resource.get("action") is not None:
        out.append(("action", _ACTION, resource["action"], None))
    if resource.get("outcome") is not None:
        out.append(("outcome", _OUTCOME, resource["outcome"], None))
    _codings(out, "type", [resource.get("type") or {}])
    _codings(out, "subtype", resource.get("subtype"))
    for agent in resource.get("agent") or ():
        who = agent.get("who") or {}
        _reference(out, "agent", who)
        identifier = who.get("identifier") or {}
        if identifier.get("value"):     # a plain agent=<client id> finds the client too
            out.append(("agent", None, identifier["value"], None))
        address = (agent.get("network") or {}).get("address")
        if address:
            out.append(("address", None, address, None))
    for entity in resource.get("entity") or ():
        what = entity.get("what")
        start = len(out)
        _reference(out, "entity", what)
        if len(out) > start and out[start][0] == "entity" and out[start][1] == "Patient":
            out.append(("patient", "Patient", out[start][2], None))
    return out
