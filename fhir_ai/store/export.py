"""Stream stored RiskAssessment versions, Provenance and AuditEvents to NDJSON or CSV for offline audit."""
from __future__ import annotations

import base64
import csv
from typing import Any, Callable, Iterator, TextIO

import orjson

from .audit import chain_values

TYPES = ("RiskAssessment", "Provenance", "AuditEvent")


def _codes(concept: dict[str, Any] | None) -> str:
    return " ".join(c.get("code", "") for c in (concept or {}).get("coding") or [])


def _who(agent: dict[str, Any]) -> str:
    who = agent.get("who") or {}
    return who.get("reference") or (who.get("identifier") or {}).get("value") or who.get("display") or ""


def _risk_assessment(r: dict[str, Any]) -> list[Any]:
    method = ((r.get("method") or {}).get("coding") or [{}])[0]
    prediction = (r.get("prediction") or [{}])[0]
    return [r["id"], r["meta"]["versionId"], r["meta"]["lastUpdated"], r.get("status"),
            (r.get("subject") or {}).get("reference"), (r.get("encounter") or {}).get("reference"),
            r.get("occurrenceDateTime"), method.get("code"), method.get("version"),
            prediction.get("probabilityDecimal"), _codes(prediction.get("qualitativeRisk")),
            ((r.get("identifier") or [{}])[0]).get("value"), len(r.get("basis") or [])]


def _provenance(r: dict[str, Any]) -> list[Any]:
    return [r["id"], r.get("recorded"), " ".join(t.get("reference", "") for t in r.get("target") or []),
            _codes(r.get("activity")), " ".join(_who(a) for a in r.get("agent") or []),
            " ".join((e.get("what") or {}).get("reference") or (e.get("what") or {}).get("display", "")
                     for e in r.get("entity") or [])]


def _what(what: dict[str, Any]) -> str:
    """An entity as a reference, or a record that is no resource (a CDS card event) as system|value."""
    if what.get("reference"):
        return str(what["reference"])
    identifier = what.get("identifier") or {}
    return f"{identifier.get('system', '')}|{identifier.get('value', '')}" if identifier else ""


def _audit_event(r: dict[str, Any]) -> list[Any]:
    agent = (r.get("agent") or [{}])[0]
    role = _codes(((agent.get("role") or [{}])[0]))
    queries = [base64.b64decode(e["query"]).decode("utf-8", "replace") for e in r.get("entity") or [] if e.get("query")]
    chain = chain_values(r)
    return [chain.get("sequence"), r["id"], r.get("recorded"), r.get("action"),
            " ".join(s.get("code", "") for s in r.get("subtype") or []), r.get("outcome"), _who(agent), role,
            (agent.get("network") or {}).get("address"),
            " ".join(_what(e["what"]) for e in r.get("entity") or [] if e.get("what")),
            " ".join(queries), r.get("outcomeDesc"), chain.get("hash"),
            " ".join(_who(a) for a in (r.get("agent") or [])[1:])]


COLUMNS: dict[str, tuple[list[str], Callable[[dict[str, Any]], list[Any]]]] = {
    "RiskAssessment": (["id", "version", "last_updated", "status", "subject", "encounter", "occurrence", "model",
                        "model_version", "probability", "risk", "identifier", "basis_count"], _risk_assessment),
    "Provenance": (["id", "recorded", "target", "activity", "agents", "entities"], _provenance),
    "AuditEvent": (["seq", "id", "recorded", "action", "subtype", "outcome", "agent", "role", "address",
                    "entities", "query", "description", "hash", "user"], _audit_event),
}


def write(resource_type: str, rows: Iterator[str], out: TextIO, fmt: str,
          tick: Callable[[], None] | None = None) -> int:
    """Write each stored JSON text as an NDJSON line (unchanged, so hashes still verify) or a CSV row."""
    count = 0
    if fmt == "csv":
        header, columns = COLUMNS[resource_type]
        writer = csv.writer(out)
        writer.writerow(header)
    for text in rows:
        if fmt == "csv":
            writer.writerow(["" if v is None else v for v in columns(orjson.loads(text))])
        else:
            out.write(text)
            out.write("\n")
        count += 1
        if tick:
            tick()
    return count
