"""What each endpoint requires: public, its own authentication, or a scope (resource, interaction).

Blueprints declare it with the decorators below; endpoints that declare nothing get a rule derived
from the path (``GET /X/...`` needs ``X`` read or search, ``POST`` create, ``PUT`` update ...).
Unknown paths still need a valid token, so nothing answers anonymously by accident.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from flask import Blueprint, Flask, Request

F = TypeVar("F", bound=Callable[..., Any])

PUBLIC = "public"            # no token: /metadata, /health ...
SELF = "self"                # the blueprint authenticates callers itself (e.g. CDS Hooks JWTs)
ATTRIBUTE = "_fhir_ai_access"
_BLUEPRINTS: dict[str, str] = {}
# Service areas that are not FHIR resource types but have scopes of their own (see scopes.py).
_AREAS = {"write-back": "WriteBack", "mappings": "Mapping", "mapping": "Mapping"}


@dataclass(frozen=True)
class Requirement:
    resource: str | None           # None: any valid token
    interaction: str = "r"         # one of c r u d s
    audit: str | None = None       # restful interaction recorded for this endpoint (None: not audited)
    audit_failures_only: bool = False   # the store audits successes itself (e.g. $assess)


def public(target: F | Blueprint) -> Any:
    """No token needed (a view function, or a whole blueprint)."""
    return _mark(target, PUBLIC)


def authenticates_itself(target: F | Blueprint) -> Any:
    """The view (or blueprint) checks its callers itself; fhir_ai.auth lets requests through untouched.

    Such a view should call ``fhir_ai.auth.guard.set_actor(...)`` once it knows the caller, so
    that what it stores is audited under that caller's name.
    """
    return _mark(target, SELF)


def requires(resource: str, interaction: str, *, audit: str | None = None,
             audit_failures_only: bool = False) -> Callable[[F], F]:
    """The view needs scope ``resource``.``interaction``; ``audit`` names the interaction to record."""
    requirement = Requirement(resource, interaction, audit, audit_failures_only)

    def decorate(view: F) -> F:
        setattr(view, ATTRIBUTE, requirement)
        return view
    return decorate


def _mark(target: Any, value: str) -> Any:
    if isinstance(target, Blueprint):
        _BLUEPRINTS[target.name] = value
    else:
        setattr(target, ATTRIBUTE, value)
    return target


def requirement_for(app: Flask, request: Request) -> Requirement | str:
    """PUBLIC, SELF or the Requirement for this request."""
    if request.method == "OPTIONS":
        return PUBLIC
    view = app.view_functions.get(request.endpoint or "")
    declared = getattr(view, ATTRIBUTE, None)
    if declared is not None:
        return declared
    if request.blueprint in _BLUEPRINTS:
        return _BLUEPRINTS[request.blueprint]
    return _by_path(request.method, request.path, view is not None)


def _by_path(method: str, path: str, routed: bool) -> Requirement | str:
    segments = [s for s in path.split("/") if s]
    first = segments[0] if segments else ""
    read = method in ("GET", "HEAD")
    if read and (first in ("metadata", "health", "OperationDefinition", ".well-known") or path == "/cds-services"):
        return PUBLIC
    if first == "cds-services" and method == "POST":
        return SELF           # CDS Hooks: the EHR's JWT is verified by the CDS Hooks blueprint (issue 5)
    if any(s.startswith("$assess") for s in segments):
        return Requirement("RiskAssessment", "c", "operation", audit_failures_only=True)
    if not routed:
        return Requirement(None)
    resource = _AREAS.get(first, first)
    if read:
        return Requirement(resource, "r" if len(segments) > 1 else "s")
    return Requirement(resource, {"POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}.get(method, "u"))
