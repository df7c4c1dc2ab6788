"""Who is acting: the authenticated client of the current request, or this process (CLI, worker)."""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from ..fhir.ids import usable_id

# The resource types CDS Hooks names for the user (context.userId of patient-view, encounter-start ...).
USER_TYPES = ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson")


@dataclass(frozen=True)
class Actor:
    """A caller as the audit trail records it (no patient data: a client id, a role, an address)."""
    client_id: str
    role: str
    address: str | None = None
    kind: str = "client"          # client (bearer token) | local (this process) | anonymous
    issuer: str | None = None     # a JWT client's issuer (``iss``): its client id is unique only there
    # The person the client says is acting (CDS Hooks context.userId, e.g. 'Practitioner/123'): stated by the
    # authenticated client, not authenticated by fhir_ai; a second agent of the audit events, never the caller.
    user: str | None = None

    @property
    def is_user(self) -> bool:
        return self.kind == "client"


def user_reference(user: str) -> bool:
    """A user given as a relative reference 'Type/id' of one of ``USER_TYPES`` with a usable FHIR id: the only
    form fhir_ai records as a reference (the audit trail and Provenance name it as given)."""
    kind, slash, rid = user.partition("/")
    return bool(slash) and kind in USER_TYPES and usable_id(rid)


LOCAL = Actor("fhir-ai", "system", None, "local")
ANONYMOUS = Actor("anonymous", "none", None, "anonymous")
_current: ContextVar[Actor | None] = ContextVar("fhir_ai_actor", default=None)


def current() -> Actor:
    """The actor set for this request (by fhir_ai.auth), else this process itself."""
    return _current.get() or LOCAL


def set_current(actor: Actor | None) -> object:
    """Set the actor for the rest of this request; returns a token for ``reset``."""
    return _current.set(actor)


def reset(token: object) -> None:
    try:
        _current.reset(token)  # type: ignore[arg-type]
    except ValueError:         # set in another context (should not happen): just clear it
        _current.set(None)
