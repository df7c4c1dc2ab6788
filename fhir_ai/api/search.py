"""Answer FHIR searches and histories over the store with Bundles (keyset-paged next links)."""
from __future__ import annotations

from typing import Any, Callable
from urllib.parse import urlencode

from flask import Response, current_app, request

from .. import codes
from ..auth import guard
from ..pipeline import Pipeline
from ..search import PARAMETERS, parse_query
from ..search.params import MAX_COUNT, SORT_PARAMETER, Cursor, HistoryCursor
from ..store.audit import Entity
from .fhir_io import base_url, check_accept, fhir_response, lenient


def search_response(resource_type: str,
                    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                    entities: Callable[[list[dict[str, Any]]], list[Entity]] | None = None) -> Response:
    """A searchset page; ``entities``: what else the page's AuditEvent names (e.g. patients the resources
    do not name themselves)."""
    check_accept(request)
    query = parse_query(resource_type, request.args.items(multi=True), lenient=lenient())
    pipeline: Pipeline = current_app.extensions["fhir_ai"]
    page = pipeline.store.search(query)
    guard.note_entities(guard.entities_of(page.resources) + (entities(page.resources) if entities else []))
    path = f"{base_url()}/{resource_type}"
    links = page_links(path, query.echo, query.cursor, page.next_cursor)
    entries: list[dict[str, Any]] = []
    for resource in page.resources:
        shown = transform(resource) if transform else resource
        entries.append({"fullUrl": f"{path}/{resource['id']}", "resource": shown, "search": {"mode": "match"}})
    if query.ignored:
        entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [{
            "severity": "warning", "code": "not-supported",
            "diagnostics": f"ignored unsupported or invalid search parameter(s) {sorted(set(query.ignored))}"}]},
            "search": {"mode": "outcome"}})
    body: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": page.total, "link": links}
    if entries:
        body["entry"] = entries
    return fhir_response(body)


def page_links(path: str, echo: list[tuple[str, str]], cursor: Cursor | HistoryCursor | None,
               next_cursor: Cursor | HistoryCursor | None) -> list[dict[str, str]]:
    """``self`` (the accepted parameters and this page's cursor) and, when there is one, ``next``."""
    self_params = list(echo) + ([("_cursor", cursor.encode())] if cursor else [])
    links = [{"relation": "self", "url": f"{path}?{urlencode(self_params)}" if self_params else path}]
    if next_cursor is not None:
        links.append({"relation": "next", "url": f"{path}?{urlencode([*echo, ('_cursor', next_cursor.encode())])}"})
    return links


def history_bundle(resources: list[dict[str, Any]], resource_type: str, *, total: int | None = None,
                   links: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A history Bundle, newest version first (``total``: of all pages; default: these versions)."""
    base = base_url()
    entries = []
    for resource in resources:
        version = resource["meta"]["versionId"]
        entries.append({
            "fullUrl": f"{base}/{resource_type}/{resource['id']}", "resource": resource,
            # A create was a POST to the type (the server assigned the id), a new version a PUT to the instance.
            "request": {"method": "POST", "url": resource_type} if version == "1"
            else {"method": "PUT", "url": f"{resource_type}/{resource['id']}"},
            "response": {"status": "201 Created" if version == "1" else "200 OK",
                         "etag": f'W/"{version}"', "lastModified": resource["meta"]["lastUpdated"]}})
    body: dict[str, Any] = {"resourceType": "Bundle", "type": "history",
                            "total": len(entries) if total is None else total}
    if links:
        body["link"] = links
    if entries:
        body["entry"] = entries
    return body


_SEARCH_TYPES = {"id": "token"}
_INTERACTIONS = {"RiskAssessment": ["read", "vread", "history-instance", "history-type", "search-type"],
                 "Provenance": ["read", "search-type"], "AuditEvent": ["read", "search-type"]}
WITHDRAW_DEFINITION = f"{codes.BASE}/OperationDefinition/withdraw"


def capability_resources() -> list[dict[str, Any]]:
    """CapabilityStatement.rest.resource entries for what the store serves, from the search definitions."""
    out = []
    for resource_type, params in PARAMETERS.items():
        search_params = [{"name": p.name, "type": _SEARCH_TYPES.get(p.kind, p.kind), "definition": p.definition,
                          **({"documentation": p.documentation} if p.documentation else {})}
                         for p in params.values()]
        search_params += [
            {"name": "_count", "type": "number", "documentation": f"page size, at most {MAX_COUNT}"},
            {"name": "_sort", "type": "string", "documentation": f"{SORT_PARAMETER[resource_type]} or "
                                                                 f"-{SORT_PARAMETER[resource_type]}"},
            {"name": "_summary", "type": "token", "documentation": "count"}]
        entry: dict[str, Any] = {"type": resource_type,
                                 "interaction": [{"code": c} for c in _INTERACTIONS[resource_type]],
                                 "versioning": "versioned" if resource_type == "RiskAssessment" else "no-version",
                                 "readHistory": resource_type == "RiskAssessment", "updateCreate": False,
                                 "searchParam": search_params}
        if resource_type == "RiskAssessment":
            entry["operation"] = [{"name": "withdraw", "definition": WITHDRAW_DEFINITION,
                                   "documentation": "mark entered-in-error as a new version (Parameters: reason)"}]
        out.append(entry)
    return out


SECURITY = {
    "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                             "code": "SMART-on-FHIR"}]}],
    "description": ("Bearer tokens: JWTs (RS384/ES384) from the configured issuer, or static tokens issued by the "
                    "site. SMART scopes system/RiskAssessment.*, system/Provenance.*, system/AuditEvent.* decide "
                    "what a client may do; /metadata and /health need no token."),
}
