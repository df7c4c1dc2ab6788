"""SMART-style scopes (v1 ``system/X.read`` and v2 ``system/X.rs``) and the roles built from them.

https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html — fhir_ai reads ``system/`` scopes
only. ``user/`` scopes mean "what this user may see", and ``patient/`` scopes "this patient's data";
fhir_ai knows neither a user's permissions nor a launch context, so read as ``system/`` they would hand
a clinician's app the whole hospital (every patient's assessments, batch jobs, the audit trail). They
grant nothing here.
Besides FHIR resource types, two service areas have scopes of their own: ``Mapping`` (check with
``r``, reload with ``u``) and ``WriteBack`` (the outbox, ``r``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_SCOPE = re.compile(r"(system|user|patient)/(\*|[A-Za-z]+)\.(read|write|\*|[cruds]+)")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
INTERACTIONS = "cruds"        # create read update delete search

ROLES: dict[str, str] = {
    # EHR systems assess (create), read and search assessments; they may also withdraw one (update).
    # Least privilege: no letter a route does not need (nothing is ever deleted, mappings are listed by read).
    "ehr": "system/RiskAssessment.crus",
    # Integrators check and reload mappings and watch the write-back outbox.
    "integrator": "system/Mapping.ru system/WriteBack.rs",
    # Auditors read; they cannot assess or write anything.
    "auditor": "system/RiskAssessment.rs system/Provenance.rs system/AuditEvent.rs",
    # Operators (and the test suite): everything.
    "admin": "system/*.cruds",
}


@dataclass(frozen=True)
class Scopes:
    grants: dict[str, str] = field(default_factory=dict)     # resource type (or *) → interaction letters
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "Scopes":
        grants: dict[str, str] = {}
        for item in text.split():
            match = _SCOPE.fullmatch(item)
            if not match or match.group(1) != "system":
                continue          # openid, launch, user/..., patient/... grant nothing here
            letters = _V1.get(match.group(3), match.group(3))
            resource = match.group(2)
            grants[resource] = "".join(sorted(set(grants.get(resource, "")) | set(letters)))
        return cls(grants, " ".join(text.split()))

    def allows(self, resource: str, interaction: str) -> bool:
        return any(interaction in self.grants.get(key, "") for key in (resource, "*"))

    def covers(self, other: "Scopes") -> bool:
        return all(self.allows(resource, letter) for resource, letters in other.grants.items()
                   for letter in letters if resource != "*") and (
            "*" not in other.grants or all(letter in self.grants.get("*", "") for letter in other.grants["*"]))


def role_scopes(role: str) -> Scopes:
    return _ROLE_SCOPES[role]


# Parsed once: every request of a static token (and every JWT's role_of) reads them. Scopes is frozen
# and nothing changes its grants.
_ROLE_SCOPES = {role: Scopes.parse(text) for role, text in ROLES.items()}


def role_of(scopes: Scopes) -> str:
    """The broadest role these scopes amount to (for the audit trail), else 'custom'."""
    for role in ("admin", "ehr", "auditor", "integrator"):
        if scopes.covers(role_scopes(role)):
            return role
    return "custom"
