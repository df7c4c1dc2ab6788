"""The Provenance of an assessment names the user a client said it acted for (CDS Hooks context.userId):
an agent of its own (``Provenance?agent=`` finds it) and the client's ``onBehalfOf``; without a user, nothing
changes. (The CDS Hooks calls themselves: test_cds_hooks.py.)"""
from __future__ import annotations

import copy
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.provenance import Provenance

from fhir_ai.cli import main
from fhir_ai.store import export
from fhir_ai.store.actors import Actor
from fhir_ai.store.audit import Access, build_event
from fhir_ai.store.provenance import SECURITY_ROLE, USER_SYSTEM, for_assessment

try:
    from .stored import risk_assessment
except ImportError:
    from stored import risk_assessment  # type: ignore[no-redef]

EHR = Actor("ehr-client", "ehr", "10.0.0.7", "client", "https://ehr.example.org/")
NOW = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
FHIR = "application/fhir+json"


def provenance_of(actor: Actor) -> dict[str, Any]:
    stored = {**risk_assessment("u1"), "meta": {"versionId": "1"}}
    return for_assessment(stored, model_id="deterioration", model_version="1.0", actor=actor, recorded=NOW)


def by_type(prov: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["type"]["coding"][0]["code"]: a for a in prov["agent"]}


@pytest.mark.parametrize("user", ["Practitioner/123", "PractitionerRole/pr-1", "Patient/p.1", "RelatedPerson/r-9"])
def test_the_user_is_an_agent_and_the_clients_on_behalf_of(user: str) -> None:
    prov = provenance_of(replace(EHR, user=user))
    Provenance.model_validate(prov)                     # a valid R4 (R4B model) Provenance
    agents = by_type(prov)
    assert list(agents) == ["author", "enterer", "humanuser"]
    assert agents["humanuser"] == {
        "type": {"coding": [{"system": SECURITY_ROLE, "code": "humanuser", "display": "human user"}],
                 "text": "user stated by the client"},
        "who": {"reference": user}}
    assert agents["enterer"]["onBehalfOf"] == {"reference": user}
    assert agents["enterer"]["who"]["identifier"] == {"system": "https://ehr.example.org/", "value": "ehr-client"}
    assert "onBehalfOf" not in agents["author"]
    # The auditors' CSV export lists the user among the agents.
    header, columns = export.COLUMNS["Provenance"]
    assert dict(zip(header, columns(prov)))["agents"].split() == ["#model", "ehr-client", user]


@pytest.mark.parametrize("user", ["Device/123", "Practitioner/..", "urn:uuid:7d3f", "Practitioner/a_b"])
def test_a_user_not_named_as_a_user_reference_is_named_by_identifier(user: str) -> None:
    """Not a relative reference of a user type with a usable id: an identifier in this server's namespace,
    assigned by the client that named it (the AuditEvent names it the same way)."""
    actor = replace(EHR, user=user)
    prov = provenance_of(actor)
    Provenance.model_validate(prov)
    who = {"identifier": {"system": USER_SYSTEM, "value": user, "assigner": {"display": "ehr-client"}},
           "display": f"user {user} (as named by ehr-client)"}
    agents = by_type(prov)
    assert agents["humanuser"]["who"] == who and agents["enterer"]["onBehalfOf"] == who
    event = build_event(Access("C", "create", operation="assess"), actor, NOW)
    AuditEvent.model_validate(event)
    assert event["agent"][1]["who"] == who


def test_without_a_user_the_provenance_is_unchanged() -> None:
    prov = provenance_of(EHR)
    assert [a["type"]["coding"][0]["code"] for a in prov["agent"]] == ["author", "enterer"]
    assert all("onBehalfOf" not in a for a in prov["agent"])


def provenances(client, query: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in client.get(f"/Provenance?{query}&_count=100").json.get("entry", [])]


def audit_events(client, query: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in client.get(f"/AuditEvent?{query}&_count=100").json.get("entry", [])]


def test_the_user_is_searchable_and_a_repeat_by_another_user_stores_nothing_new(app, client, runner) -> None:
    """Provenance?agent=Practitioner/123 finds what was assessed for that user; the same assessment asked for by
    another user is the stored one (its id is derived from its content): no new Provenance, and the repeat is
    an AuditEvent naming the second user."""
    store = app.extensions["fhir_ai"].store
    resource = risk_assessment("u1")
    first = store.save_assessment(copy.deepcopy(resource), model_id="deterioration", model_version="1.0",
                                  actor=replace(EHR, user="Practitioner/123"))
    again = store.save_assessment(copy.deepcopy(resource), model_id="deterioration", model_version="1.0",
                                  actor=replace(EHR, user="Practitioner/456"))
    assert first.created and not again.created and again.resource == first.resource

    (prov,) = provenances(client, "agent=Practitioner/123")
    Provenance.model_validate(prov)
    assert prov["target"] == [{"reference": "RiskAssessment/u1/_history/1"}]
    assert by_type(prov)["humanuser"]["who"] == {"reference": "Practitioner/123"}
    assert [p["id"] for p in provenances(client, "agent=123")] == [prov["id"]]      # the id alone, any type
    assert provenances(client, "agent=Practitioner/456") == []
    assert provenances(client, "agent=PractitionerRole/123") == []
    # the :Type modifier, with R4's agent targets (it was a 400: the parameter named no target types)
    assert [p["id"] for p in provenances(client, "agent:Practitioner=123")] == [prov["id"]]
    assert provenances(client, "agent:PractitionerRole=123") == []
    assert [e["action"] for e in audit_events(client, "agent:Practitioner=456")] == ["R"]
    # The client is still found as before, and there is one Provenance for the assessment.
    client_query = "agent:identifier=https://ehr.example.org/|ehr-client"
    assert [p["id"] for p in provenances(client, client_query)] == [prov["id"]]
    assert len(provenances(client, "target=RiskAssessment/u1")) == 1

    (repeat,) = audit_events(client, "agent=Practitioner/456")
    assert repeat["action"] == "R" and repeat["outcomeDesc"].startswith("repeated request")
    assert repeat["agent"][1]["who"] == {"reference": "Practitioner/456"} and repeat["agent"][1]["requestor"]
    assert [e["what"]["reference"] for e in repeat["entity"]][0] == "RiskAssessment/u1/_history/1"
    assert [e["action"] for e in audit_events(client, "agent=Practitioner/123")] == ["C"]
    verified = runner.invoke(main, ["audit", "verify", "--no-progress"])
    assert verified.exit_code == 0 and "OK" in verified.output, verified.output


def test_an_assess_without_a_user_names_the_model_and_the_client_only(client) -> None:
    """$assess (a bearer-token client, no user): author and enterer, as before; no humanuser agent."""
    body = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}]}
    answer = client.post("/Patient/demo-005/$assess", json=body, content_type=FHIR)
    assert answer.status_code == 200, answer.json
    made = [e["resource"]["id"] for e in answer.json["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]
    assert made
    for rid in made:
        (prov,) = provenances(client, f"target=RiskAssessment/{rid}")
        Provenance.model_validate(prov)
        assert [a["type"]["coding"][0]["code"] for a in prov["agent"]] == ["author", "enterer"]
        assert all("onBehalfOf" not in a for a in prov["agent"])


def test_the_capability_statement_says_what_provenance_agent_finds(client) -> None:
    """Declared as R4's Provenance-agent (agent.who, which the index holds), saying whom it finds."""
    resources = {r["type"]: r for r in client.get("/metadata").json["rest"][0]["resource"]}
    (agent,) = [p for p in resources["Provenance"]["searchParam"] if p["name"] == "agent"]
    assert agent["type"] == "reference"
    assert agent["definition"] == "http://hl7.org/fhir/SearchParameter/Provenance-agent"
    assert "agent=Practitioner/123" in agent["documentation"]
