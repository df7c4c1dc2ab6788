"""Provenance for each assessment version, after the HL7 AI Transparency on FHIR approach.

The model is the author: a contained Device with the model id and version. The inputs (basis
Observations), the model card and the mapping file the inputs went through are entities; the client
that asked is a second agent.
https://build.fhir.org/ig/HL7/aitransparency-ig/
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .. import codes
from ..fhir import times
from .actors import Actor

if TYPE_CHECKING:
    from ..mapping import Mapping

PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
MODEL_CARD = f"{codes.BASE}/model-card"
MAPPING = f"{codes.BASE}/mapping"            # value "<model>|<sha256 of the mapping file>"
CLIENT_SYSTEM = f"{codes.BASE}/identifier/client"
ROLE_SYSTEM = f"{codes.BASE}/CodeSystem/role"


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


def _agent(code: str, who: dict[str, Any], role: str | None = None) -> dict[str, Any]:
    agent: dict[str, Any] = {"type": {"coding": [{"system": PARTICIPANT, "code": code}]}, "who": who}
    if role:
        agent["role"] = [{"coding": [{"system": ROLE_SYSTEM, "code": role}]}]
    return agent


def for_assessment(resource: dict[str, Any], *, model_id: str, model_version: str, actor: Actor,
                   recorded: datetime, mapping: MappingUsed | None = None) -> dict[str, Any]:
    """Provenance of version 1: the model made it from these inputs, through this mapping, at this
    client's request."""
    version = int(resource["meta"]["versionId"])
    entities = [{"role": "source", "what": {"reference": b["reference"]}} for b in resource.get("basis") or []]
    if model_id != "news2":   # a rule score has no trained model and so no card
        entities.append({"role": "source", "what": {
            "identifier": {"system": MODEL_CARD, "value": f"{model_id}|{model_version}"},
            "display": f"model card of {model_id} {model_version}"}})
    if mapping is not None:   # NEWS2's values came through the mapping too
        entities.append(mapping.entity())
    return {
        "resourceType": "Provenance", "id": provenance_id(resource["id"], version),
        "contained": [_device(model_id, model_version)],
        "target": [{"reference": f"RiskAssessment/{resource['id']}/_history/{version}"}],
        "recorded": times.format_datetime(recorded),
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE", "display": "create"}]},
        "agent": [_agent("author", {"reference": "#model", "display": f"fhir_ai {model_id} {model_version}"}),
                  _agent("enterer", client_reference(actor), actor.role)],
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
