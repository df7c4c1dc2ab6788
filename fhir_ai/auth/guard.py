"""Flask hooks: authenticate every request, enforce scopes, and audit reads, searches and denials."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from flask import Flask, Response, current_app, g, request

from ..api.fhir_io import fhir_response
from ..errors import FhirAiError, Forbidden, Unauthorized
from ..store import actors
from ..store.actors import ANONYMOUS, Actor
from ..store.audit import Access, Entity, outcome_for_status
from . import policy
from .policy import PUBLIC, SELF, Requirement
from .tokens import Principal, TokenVerifier

log = logging.getLogger(__name__)

_ACTIONS = {"read": "R", "vread": "R", "history-instance": "R", "history-type": "R", "search-type": "E",
            "create": "C", "update": "U", "delete": "D", "operation": "E"}
_BY_LETTER = {"r": "read", "s": "search-type", "c": "create", "u": "update", "d": "delete"}


def init_app(app: Flask) -> None:
    """Install the hooks; fails at start-up (ConfigurationError) on unusable token settings."""
    app.extensions["fhir_ai_auth"] = TokenVerifier.from_settings(app.config["FHIR_AI"])
    app.before_request(_authenticate)
    app.after_request(_audit)
    app.teardown_request(_forget)


def set_actor(client_id: str, role: str, kind: str = "client") -> None:
    """For blueprints that authenticate their callers themselves: name the caller for the audit trail."""
    g.fhir_ai_actor = Actor(client_id, role, request.remote_addr, kind)
    g.fhir_ai_actor_token = actors.set_current(g.fhir_ai_actor)


def set_user(reference: str) -> None:
    """For blueprints that authenticate their callers themselves: the person the authenticated caller says is
    acting (a checked relative reference such as 'Practitioner/123'), recorded as a second agent of the
    audit events of the rest of this request. No caller named yet (nothing authenticated): nothing is kept."""
    actor = g.get("fhir_ai_actor")
    if actor is None:
        return
    token = g.pop("fhir_ai_actor_token", None)
    if token is not None:
        actors.reset(token)
    g.fhir_ai_actor = replace(actor, user=reference)
    g.fhir_ai_actor_token = actors.set_current(g.fhir_ai_actor)


def note_entities(entities: list[Entity]) -> None:
    """What this request read, for its audit event."""
    g.setdefault("fhir_ai_entities", []).extend(entities)


def refused(exc: FhirAiError, interaction: str = "create") -> None:
    """For blueprints that authenticate their callers themselves: audit this refusal (401) like the
    API's own denials, as an anonymous caller's refused ``interaction``, with the reason."""
    letter = {"read": "r", "search-type": "s", "create": "c", "update": "u", "delete": "d"}.get(interaction, "c")
    g.fhir_ai_requirement = Requirement(None, letter, interaction)
    g.fhir_ai_denied = (Actor(ANONYMOUS.client_id, ANONYMOUS.role, request.remote_addr, "anonymous"), exc.message)


def not_audited() -> None:
    """This successful answer says nothing worth an AuditEvent (a job's progress while it runs)."""
    g.fhir_ai_unaudited = True


def entities_of(resources: list[dict[str, Any]]) -> list[Entity]:
    """Each resource (versioned) and each patient it is about."""
    out: list[Entity] = []
    patients: dict[str, None] = {}
    for resource in resources:
        version = (resource.get("meta") or {}).get("versionId")
        ref = f"{resource['resourceType']}/{resource['id']}"
        out.append(Entity(f"{ref}/_history/{version}" if version else ref))
        subject = (resource.get("subject") or {}).get("reference") or ""
        if subject.startswith("Patient/"):
            patients[subject] = None
    return out + [Entity(p) for p in patients]


def principal() -> Principal | None:
    return g.get("fhir_ai_principal")


def _authenticate() -> Response | None:
    requirement = policy.requirement_for(current_app, request)
    g.fhir_ai_requirement = requirement
    if requirement in (PUBLIC, SELF):
        return None
    assert isinstance(requirement, Requirement)
    anonymous = Actor(ANONYMOUS.client_id, ANONYMOUS.role, request.remote_addr, "anonymous")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _deny(Unauthorized("a bearer token is required (Authorization: Bearer <token>)"), anonymous)
    verifier: TokenVerifier = current_app.extensions["fhir_ai_auth"]
    try:
        who = verifier.verify(token.strip())
    except Unauthorized as exc:
        return _deny(exc, anonymous)
    actor = Actor(who.client_id, who.role, request.remote_addr, "client", who.issuer)
    g.fhir_ai_principal = who
    g.fhir_ai_actor = actor
    g.fhir_ai_actor_token = actors.set_current(actor)
    if requirement.resource and not who.scopes.allows(requirement.resource, requirement.interaction):
        needed = f"system/{requirement.resource}.{requirement.interaction}"
        return _deny(Forbidden(f"this needs scope {needed}; the token's role is {who.role}"), actor, needed)
    return None


def _deny(exc: FhirAiError, actor: Actor, scope: str | None = None) -> Response:
    g.fhir_ai_denied = (actor, exc.message)
    log.info("denied %s %s (%s) for %s", request.method, request.path, exc.status, actor.client_id)
    if exc.status == 401:
        challenge = 'Bearer realm="fhir_ai"' + (', error="invalid_token"' if actor.kind != "anonymous" or
                                                 request.headers.get("Authorization") else "")
    else:
        challenge = f'Bearer realm="fhir_ai", error="insufficient_scope", scope="{scope}"'
    return fhir_response(exc.to_operation_outcome(), exc.status, headers={"WWW-Authenticate": challenge})


def _audit(response: Response) -> Response:
    requirement = g.get("fhir_ai_requirement")
    denied = g.get("fhir_ai_denied")
    status = response.status_code
    if denied is not None:
        actor, reason = denied
        letter = requirement.interaction if isinstance(requirement, Requirement) else "r"
        interaction = (requirement.audit if isinstance(requirement, Requirement) and requirement.audit
                       else _BY_LETTER.get(letter, "read"))
        access = Access(_ACTIONS.get(interaction, "E"), interaction, "4",
                        description=f"{status} {request.method} {request.path}: {reason}", actor=actor,
                        entities=_path_entities())
    elif isinstance(requirement, Requirement) and requirement.audit:
        if (requirement.audit_failures_only or g.get("fhir_ai_unaudited")) and status < 400:
            return response
        interaction = requirement.audit
        access = Access(_ACTIONS.get(interaction, "E"), interaction, outcome_for_status(status),
                        description=None if status < 400 else f"{status} {request.method} {request.path}",
                        entities=g.get("fhir_ai_entities") or _path_entities(),
                        query=(request.query_string.decode("utf-8", "replace")
                               if interaction in ("search-type", "history-type") else None),
                        operation=_operation(), actor=g.get("fhir_ai_actor"))
    else:
        return response
    pipeline = current_app.extensions["fhir_ai"]
    pipeline.store.record_access(access)
    return response


def _operation() -> str | None:
    last = request.path.rstrip("/").rsplit("/", 1)[-1]
    return last[1:] if last.startswith("$") else None


def _path_entities() -> list[Entity]:
    segments = [s for s in request.path.split("/") if s]
    if len(segments) >= 2 and segments[0][:1].isupper() and not segments[1].startswith(("$", "_")):
        return [Entity(f"{segments[0]}/{segments[1]}")]
    return []


def _forget(_exc: BaseException | None) -> None:
    token = g.pop("fhir_ai_actor_token", None)
    if token is not None:
        actors.reset(token)
