"""FHIR JSON in and out of Flask: content types, request bodies, Bundles, OperationOutcomes."""
from __future__ import annotations

import re
from typing import Any

import orjson
from flask import Request, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import http_date, parse_list_header

from ..codes import FHIR_JSON
from ..fhir.ids import ID, usable_id
from ..fhir.times import parse_datetime
from ..errors import BadRequest, NotAcceptable, UnsupportedMediaType

ACCEPTED_BODY_TYPES = {"application/fhir+json", "application/json", "application/json+fhir"}


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(orjson.dumps(body), status=status, mimetype=FHIR_JSON)
    response.headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def version_headers(resource: dict[str, Any]) -> dict[str, str]:
    """ETag (the version) and Last-Modified (an HTTP date, RFC 9110: whole seconds in GMT) of a stored resource."""
    meta = resource["meta"]
    return {"ETag": f'W/"{meta.get("versionId", "1")}"', "Last-Modified": http_date(parse_datetime(meta["lastUpdated"]))}


def check_accept(req: Request) -> None:
    """JSON only: an explicit request for XML (Accept or _format) gets 406."""
    fmt = req.args.get("_format")
    if fmt and fmt not in ("json", "application/json", "application/fhir+json"):
        raise NotAcceptable(f"_format {fmt!r} is not supported; this server speaks FHIR JSON",
                            expression="_format")
    accept = req.headers.get("Accept", "")
    if accept and not any(t in accept for t in ("json", "*/*", "application/*")):
        raise NotAcceptable(f"cannot answer in {accept!r}; use application/fhir+json", header="Accept")


def request_bytes() -> bytes:
    """The request body; over MAX_CONTENT_LENGTH → 413. Werkzeug refuses a long body that says its
    length before reading it, but a chunked one (no Content-Length; gunicorn marks it terminated) it
    only stops reading at the limit: such a body that reaches the limit was cut off, not complete."""
    raw = request.get_data(cache=True)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is None and len(raw) >= limit:
        raise RequestEntityTooLarge()
    return raw


def read_body(resource_type: str, *, optional: bool = False) -> dict[str, Any] | None:
    raw = request_bytes()
    if not raw.strip():
        if optional:
            return None
        raise BadRequest(f"a {resource_type} resource is required in the request body", expression=resource_type)
    mimetype = request.mimetype
    if mimetype and mimetype not in ACCEPTED_BODY_TYPES:
        raise UnsupportedMediaType(f"Content-Type {mimetype!r} is not supported; send application/fhir+json",
                                   header="Content-Type")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", expression=resource_type) from exc
    if not isinstance(body, dict) or body.get("resourceType") != resource_type:
        found = body.get("resourceType") if isinstance(body, dict) else type(body).__name__
        raise BadRequest(f"expected a {resource_type} resource, got {found!r}", expression="resourceType")
    return body


def check_id(value: str, expression: str) -> str:
    if not ID.fullmatch(value):
        raise BadRequest("not a FHIR id (1-64 of A-Z a-z 0-9 - .)", expression=expression)
    if not usable_id(value):
        raise BadRequest("an id of dots only names no resource (it is a path segment)", expression=expression)
    return value


def preferences() -> dict[str, str]:
    """The request's preferences (RFC 7240: any number of Prefer lines, each a comma-separated list of
    ``name[=value][; parameters]``, names case-insensitive; a comma or a name inside a quoted value is part
    of that value, not a preference of its own): {name: value ('' for none)}, lower case, the first of each."""
    out: dict[str, str] = {}
    for line in request.headers.getlist("Prefer"):
        for preference in parse_list_header(line):
            name, _, value = preference.split(";", 1)[0].partition("=")
            out.setdefault(name.strip().lower(), value.strip().strip('"').lower())
    return out


def lenient() -> bool:
    """``Prefer: handling=lenient``: unknown parameters are ignored instead of refused."""
    return preferences().get("handling") == "lenient"


def bundle(kind: str, resources: list[dict[str, Any]], base: str, *, total: int | None = None,
           links: list[dict[str, str]] | None = None, outcome: dict[str, Any] | None = None,
           texts: list[str | None] | None = None) -> dict[str, Any]:
    """``texts``: each resource's JSON as orjson made it when it was stored (None: not at hand),
    embedded as it is (orjson.Fragment) instead of serialising the resource again; same bytes."""
    entries: list[dict[str, Any]] = []
    for i, resource in enumerate(resources):
        text = texts[i] if texts is not None else None
        entry: dict[str, Any] = {"fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
                                 "resource": resource if text is None else orjson.Fragment(text)}
        if kind == "searchset":
            entry["search"] = {"mode": "match"}
        entries.append(entry)
    if outcome is not None:
        entry = {"resource": outcome}
        if kind == "searchset":
            entry["search"] = {"mode": "outcome"}
        entries.append(entry)
    out: dict[str, Any] = {"resourceType": "Bundle", "type": kind}
    if total is not None:
        out["total"] = total
    if links:
        out["link"] = links
    out["entry"] = entries
    return out


def base_url() -> str:
    """Our base URL for links we hand out: FHIR_AI_PUBLIC_URL, else this request's own (Host header)."""
    return current_app.config["FHIR_AI"].public_url.rstrip("/") or request.url_root.rstrip("/")
