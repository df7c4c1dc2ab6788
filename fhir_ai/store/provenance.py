"""Provenance for each assessment version, after the HL7 AI Transparency on FHIR approach.

The model is the author: a contained Device with the model id and version. The inputs (basis
Observations), the model card and the mapping file the inputs went through are entities; the client
that asked is a second agent and, when it names the user it acted for (CDS Hooks context.userId), that
user is a third (and the client's ``onBehalfOf``).
https://build.fhir.org/ig/HL7/aitransparency-ig/
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .. import codes
from ..fhir import times
from .actors import Actor, user_reference

if TYPE_CHECKING:
    from ..mapping import Mapping

PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
MODEL_CARD = f"{codes.BASE}/model-card"
MAPPING = f"{codes.BASE}/mapping"            # value "<model>|<sha256 of the mapping file>"
CLIENT_SYSTEM = f"{codes.BASE}/identifier/client"
ROLE_SYSTEM = f"{codes.BASE}/CodeSystem/role"
USER_SYSTEM = f"{codes.BASE}/identifier/user"   # a user the client named otherwise than as 'Type/id'
SECURITY_ROLE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"


@dataclass(frozen=True)
class MappingUsed:
    """The mapping file an assessment's inputs went through (it may differ from the one the model was
    trained with, e.g. by an added hospital code: the card's ``mapping.digest`` names that one)."""
    model: str
    version: str
    file: str
    digest: str         # sha256 of the file's bytes, as GET /mappings shows it

    @classmethod
    def of(cls, mapping: Mapping) -> MappingUsed:
        return cls(mapping.model, mapping.version, mapping.path.name, mapping.digest)

    def entity(self) -> dict[str, Any]:
        return {"role": "source", "what": {
            "identifier": {"system": MAPPING, "value": f"{self.model}|{self.digest}"},
            "display": f"mapping {self.file} version {self.version} (sha256 {self.digest})"}}


def provenance_id(assessment_id: str, version: int) -> str:
    return f"prov-{assessment_id}-{version}"


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")


def client_reference(actor: Actor) -> dict[str, Any]:
    """The caller as a Reference by identifier. A JWT client's id is unique only at the token's issuer:
    the issuer is the identifier's system when it is an absolute URI (``agent:identifier=<iss>|<client>``
    then finds one client), else it is named as the assigner. Static-token clients and fhir_ai itself
    are in this server's own namespace (``CLIENT_SYSTEM``)."""
    issuer = actor.issuer
    if not issuer:
        return {"identifier": {"system": CLIENT_SYSTEM, "value": actor.client_id}, "display": actor.client_id}
    if _URI.fullmatch(issuer):
        identifier: dict[str, Any] = {"system": issuer, "value": actor.client_id}
    else:
        identifier = {"system": CLIENT_SYSTEM, "value": actor.client_id, "assigner": {"display": issuer}}
    return {"identifier": identifier, "display": f"{actor.client_id} (issuer {issuer})"}


def _device(model_id: str, model_version: str) -> dict[str, Any]:
    return {"resourceType": "Device", "id": "model",
            "identifier": [{"system": codes.MODEL_VERSION_SYSTEM, "value": f"{model_id}|{model_version}"}],
            "deviceName": [{"name": f"fhir_ai {model_id}", "type": "model-name"}],
            "type": {"text": "AI/ML model (software)"},
            "version": [{"value": model_version}]}


def user_who(actor: Actor) -> dict[str, Any]:
    """The user the client says it acted for, as ``agent.who``: the reference as given when it is one of a user
    type (``Provenance?agent=Practitioner/123`` finds it), else by identifier in this server's namespace, with
    the client that named it as the assigner (its value is unique only there)."""
    user = actor.user or ""
    if user_reference(user):
        return {"reference": user}
    return {"identifier": {"system": USER_SYSTEM, "value": user, "assigner": {"display": actor.client_id}},
            "display": f"user {user} (as named by {actor.client_id})"}


def user_agent(actor: Actor) -> dict[str, Any]:
    """The agent for the user on whose behalf the client asked.

    Its type: R4 binds Provenance.agent.type *extensibly* to provenance-participant-type, whose codes
    do not fit: the model is the author and the client the enterer; performer, verifier, attester, legal
    and informant would each say the clinician ran, checked, vouched for or reported the score, which they
    did not (a CDS Hooks user only opened a chart); custodian, assembler and composer are about records and
    documents. An extensible binding allows another code when none fits: ``humanuser`` (extra-security-role-type:
    the human user that participated), the code the same request's AuditEvent gives this user, and one R5's
    binding of Provenance.agent.type (participation-role-type) includes. The text says it was the client's
    statement: fhir_ai did not authenticate the user."""
    return {"type": {"coding": [{"system": SECURITY_ROLE, "code": "humanuser", "display": "human user"}],
                     "text": "user stated by the client"},
            "who": user_who(actor)}


def _agent(code: str, who: dict[str, Any], role: str | None = None) -> dict[str, Any]:
    agent: dict[str, Any] = {"type": {"coding": [{"system": PARTICIPANT, "code": code}]}, "who": who}
    if role:
        agent["role"] = [{"coding": [{"system": ROLE_SYSTEM, "code": role}]}]
    return agent


def for_assessment(resource: dict[str, Any], *, model_id: str, model_version: str, actor: Actor,
                   recorded: datetime, mapping: MappingUsed | None = None) -> dict[str, Any]:
    """Provenance of version 1: the model made it from these inputs, through this mapping, at this
    client's request (on behalf of the user it named, if any)."""
    version = int(resource["meta"]["versionId"])
    entities = [{"role": "source", "what": {"reference": b["reference"]}} for b in resource.get("basis") or []]
    if model_id != "news2":   # a rule score has no trained model and so no card
        entities.append({"role": "source", "what": {
            "identifier": {"system": MODEL_CARD, "value": f"{model_id}|{model_version}"},
            "display": f"model card of {model_id} {model_version}"}})
    if mapping is not None:   # NEWS2's values came through the mapping too
        entities.append(mapping.entity())
    agents = [_agent("author", {"reference": "#model", "display": f"fhir_ai {model_id} {model_version}"}),
              _agent("enterer", client_reference(actor), actor.role)]
    if actor.user:
        # The client asked on the user's behalf: its onBehalfOf ("for whom the change was made"). R4 (4.0.1)
        # sets Provenance no invariant of its own; R5's prov-1..4 (onBehalfOf not who itself, nor a who
        # PractitionerRole's practitioner or a who Organization's own role or service) hold as well.
        agents[1]["onBehalfOf"] = user_who(actor)
        agents.append(user_agent(actor))     # agent.who: what Provenance?agent= searches (onBehalfOf is not)
    return {
        "resourceType": "Provenance", "id": provenance_id(resource["id"], version),
        "contained": [_device(model_id, model_version)],
        "target": [{"reference": f"RiskAssessment/{resource['id']}/_history/{version}"}],
        "recorded": times.format_datetime(recorded),
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE", "display": "create"}]},
        "agent": agents,
        **({"entity": entities} if entities else {}),
    }


def for_withdrawal(resource: dict[str, Any], *, reason: str, actor: Actor, recorded: datetime) -> dict[str, Any]:
    """Provenance of an entered-in-error version: who withdrew which version, and why."""
    version = int(resource["meta"]["versionId"])
    return {
        "resourceType": "Provenance", "id": provenance_id(resource["id"], version),
        "target": [{"reference": f"RiskAssessment/{resource['id']}/_history/{version}"}],
        "recorded": times.format_datetime(recorded),
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "NULLIFY", "display": "nullify"}]},
        "reason": [{"text": reason}],
        "agent": [_agent("author", client_reference(actor), actor.role)],
        "entity": [{"role": "revision",
                    "what": {"reference": f"RiskAssessment/{resource['id']}/_history/{version - 1}"}}],
    }
