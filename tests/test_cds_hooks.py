"""CDS Hooks 2.0: discovery, calls with prefetch present / partial / missing / OperationOutcome / null,
cards checked against the specification's examples and logical-model invariants, feedback, language, JWT."""
from __future__ import annotations

import copy
import json
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import pytest
import responses
from cryptography.hazmat.primitives.asymmetric import ec
from fhir.resources.R4B.provenance import Provenance
from flask import Flask
from flask.testing import FlaskClient
from jwt.algorithms import ECAlgorithm
from sqlalchemy import text as sql_text

from fhir_ai.app import create_app
from fhir_ai.cli import main
from fhir_ai.cds import prefetch as cds_prefetch
from fhir_ai.cds.services import observation_chunks

import factories as f

CONFORMANCE = Path("/work/shared/conformance/cds-hooks")
SPEC = CONFORMANCE / "spec-2.0.1-examples"
LIBRARY = CONFORMANCE / "hooks-library-examples"
INVARIANTS = json.loads((CONFORMANCE / "logical-models-3.0.0-ballot" / "invariants.json").read_text())
FHIR = "https://ehr.example.org/fhir"
TOKEN = "some-opaque-fhir-access-token"


@pytest.fixture(autouse=True)
def ehr_server_allowed(settings_overrides: dict[str, Any]) -> None:
    """The EHR's fhirServer of these tests (FHIR) is one fhir_ai may call (unset, only its source's is)."""
    settings_overrides.setdefault("cds_fhir_servers", FHIR)


def spec(name: str) -> Any:
    # The examples were cut from the spec's Jekyll source: drop its {% raw %} escaping of "{{".
    return json.loads(re.sub(r"{%\s*(end)?raw\s*%}", "", (SPEC / name).read_text()))


# -- what a conforming response / discovery looks like (CDSHooksResponse, CDSHooksServices) ---------------

def check_response(body: dict[str, Any]) -> None:
    """The logical model's cardinalities and invariants cds-resp-1..7, and the 2.0.1 text's rules."""
    assert isinstance(body.get("cards"), list)                 # json-empty-behavior: present
    for card in body["cards"]:
        assert isinstance(card["summary"], str) and len(card["summary"]) < 140
        assert card["indicator"] in ("info", "warning", "critical")
        assert isinstance(card["source"]["label"], str) and card["source"]["label"]
        if "uuid" in card:
            uuid.UUID(card["uuid"])
        suggestions = card.get("suggestions") or []
        if suggestions:                                          # cds-resp-6
            assert card.get("selectionBehavior") in ("at-most-one", "any")
        if card.get("selectionBehavior") == "at-most-one":      # cds-resp-1
            assert sum(1 for s in suggestions if s.get("isRecommended")) <= 1
        for s in suggestions:
            assert isinstance(s["label"], str)
            for action in s.get("actions") or []:               # cds-resp-5, cds-resp-2
                assert action.get("description") and action["type"] in ("create", "update", "delete")
        for reason in card.get("overrideReasons") or []:        # cds-resp-4
            assert reason.get("display")
        for link in card.get("links") or []:
            assert link["label"] and link["url"] and link["type"] in ("absolute", "smart")
            if link["type"] != "smart":                           # cds-resp-3
                assert "appContext" not in link


def check_discovery(body: dict[str, Any]) -> None:
    assert isinstance(body.get("services"), list)
    for service in body["services"]:
        assert {"hook", "description", "id"} <= set(service)
        assert set(service) <= {"hook", "title", "description", "id", "prefetch", "usageRequirements", "extension"}
        for key, template in (service.get("prefetch") or {}).items():
            assert isinstance(key, str) and isinstance(template, str)
            # Prefetch tokens: only root-level context fields or the user identifiers (2.0.1 "Prefetch tokens").
            for token in re.findall(r"{{(.*?)}}", template):
                assert re.fullmatch(r"context\.\w+|userPractitionerId|userPractitionerRoleId|userPatientId|"
                                    r"userRelatedPersonId", token)


def test_the_checkers_accept_the_specs_examples_and_catch_violations() -> None:
    for name in ("spec-17-example.json", "spec-10-http-response.json"):
        check_response(spec(name))
    # spec-18 (the autolaunchable-link example) omits `indicator`, which the 2.0.1 card table marks REQUIRED.
    with pytest.raises(KeyError):
        check_response(spec("spec-18-example.json"))
    check_discovery(spec("spec-01-discovery-example.json"))
    check_discovery(spec("spec-27-extensions.json"))
    bad = spec("spec-17-example.json")
    bad["cards"][0]["links"][0]["appContext"] = "x"             # appContext on an absolute link
    with pytest.raises(AssertionError):
        check_response(bad)
    bad = spec("spec-17-example.json")
    bad["cards"][1]["overrideReasons"][0].pop("display")
    with pytest.raises(AssertionError):
        check_response(bad)
    assert "cds-resp-3" in INVARIANTS and "cds-fb-2" in INVARIANTS


# -- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture
def settings_overrides(settings_overrides: dict[str, Any]) -> dict[str, Any]:
    settings_overrides["cds_require_jwt"] = False     # the JWT has its own tests below and in test_cds_jwt.py
    return settings_overrides


@pytest.fixture
def record() -> dict[str, Any]:
    now = datetime.now(timezone.utc) - timedelta(minutes=5)
    patient = f.patient()
    encounter = f.encounter(patient["id"])
    return {"patient": patient, "encounter": encounter,
            "observations": f.sepsis_observations(patient["id"], encounter["id"], now)}


def searchset(resources: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources], **extra}


def hook_request(record: dict[str, Any], *, prefetch: dict[str, Any] | None = None, server: bool = True,
                 hook: str = "patient-view") -> dict[str, Any]:
    """A request shaped like the spec's example (spec-02) for our patient."""
    body = spec("spec-02-example.json")
    body["hook"] = hook
    body["hookInstance"] = str(uuid.uuid4())
    body["context"] = {"userId": "Practitioner/example", "patientId": record["patient"]["id"],
                       "encounterId": record["encounter"]["id"]}
    body["prefetch"] = prefetch if prefetch is not None else {}
    if server:
        body["fhirServer"] = FHIR
    else:
        body.pop("fhirServer")
        body.pop("fhirAuthorization")
    return body


def full_prefetch(record: dict[str, Any]) -> dict[str, Any]:
    return {"patient": record["patient"], "encounter": record["encounter"],
            "observations": searchset(record["observations"])}


def mock_server(rsps: responses.RequestsMock, record: dict[str, Any], *, observations: bool = True) -> None:
    auth = [responses.matchers.header_matcher({"Authorization": f"Bearer {TOKEN}"})]
    rsps.get(f"{FHIR}/Patient/{record['patient']['id']}", json=record["patient"], match=auth)
    rsps.get(f"{FHIR}/Encounter/{record['encounter']['id']}", json=record["encounter"], match=auth)
    if observations:
        rsps.post(f"{FHIR}/Observation/_search", json=searchset(record["observations"]), match=auth)


def call(client: FlaskClient, body: dict[str, Any], service: str = "deterioration", **headers: str) -> Any:
    return client.post(f"/cds-services/{service}", json=body, headers=headers)


def the_card(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    check_response(response.json)
    assert len(response.json["cards"]) == 1
    return response.json["cards"][0]


# -- discovery ------------------------------------------------------------------------------------------

def test_discovery_lists_loaded_models_with_prefetch_from_the_mapping(app: Flask, client: FlaskClient) -> None:
    body = client.get("/cds-services").json
    check_discovery(body)
    by_id = {s["id"]: s for s in body["services"]}
    registry = app.extensions["fhir_ai"].registry
    assert by_id["deterioration"]["hook"] == "patient-view"
    assert registry.models["deterioration"].version in by_id["deterioration"]["description"]
    prefetch = by_id["deterioration"]["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    # patient-view's encounterId is OPTIONAL: a token the EHR may be unable to fill would make it omit the
    # key, so patient-view services search the patient's encounters instead (only REQUIRED fields as tokens).
    assert prefetch["encounter"] == "Encounter?patient={{context.patientId}}"
    for service in body["services"]:
        required = {"patient-view": {"userId", "patientId"},
                    "encounter-start": {"userId", "patientId", "encounterId"}}[service["hook"]]
        for template in service["prefetch"].values():
            assert set(re.findall(r"{{context\.(\w+)}}", template)) <= required, (service["id"], template)
    mapping = registry.mappings["deterioration"]
    codes = [c for key in prefetch if key.startswith("observations")
             for c in re.search(r"code=([^&]*)", prefetch[key]).group(1).split(",")]
    assert codes == [f"{s}|{c}" for s, c in mapping.query_codes()]
    assert all(len(t) <= 1800 for t in prefetch.values())
    assert len(observation_chunks(mapping)) == sum(1 for k in prefetch if k.startswith("observations"))
    if "triage" in registry.models:
        assert by_id["triage"]["hook"] == "encounter-start"
        assert by_id["triage"]["prefetch"]["encounter"] == "Encounter/{{context.encounterId}}"
        assert by_id["triage-ed-view"]["prefetch"]["encounter"] == "Encounter?patient={{context.patientId}}"
        assert by_id["triage-ed-view"]["hook"] == "patient-view"


def test_discovery_is_truthful_about_models_that_are_not_loaded(app: Flask, client: FlaskClient) -> None:
    registry = app.extensions["fhir_ai"].registry
    registry.models.pop("triage", None)
    ids = [s["id"] for s in client.get("/cds-services").json["services"]]
    assert ids == ["deterioration"]
    assert call(client, {}, "triage").status_code == 404


# -- prefetch present / partial / missing / OperationOutcome / null --------------------------------------

@responses.activate
def test_full_prefetch_assesses_without_calling_the_ehr(client: FlaskClient, record: dict[str, Any]) -> None:
    card = the_card(call(client, hook_request(record, prefetch=full_prefetch(record))))
    assert len(responses.calls) == 0
    assert "deterioration" in card["source"]["label"] and re.search(r"\d+\.\w+", card["source"]["label"])
    detail = card["detail"]
    assert re.search(r"\*\*\d+%\*\*|<1%", detail)
    assert "**NEWS2**" in detail and "**Top contributing inputs**" in detail and "**Missing inputs**" in detail
    # NEWS2 of the septic course is high: the card cannot look routine whatever the model says.
    assert card["indicator"] == "critical"
    link = card["links"][0]
    assert link["type"] == "absolute" and "/RiskAssessment/fai-" in link["url"]
    stored = client.get(link["url"].replace("http://localhost", ""))
    assert stored.status_code == 200 and stored.json["subject"]["reference"] == f"Patient/{record['patient']['id']}"


def test_a_withdrawn_assessment_is_never_shown_as_a_risk(client: FlaskClient, record: dict[str, Any]) -> None:
    """A clinician withdrew the assessment (entered in error); the same data come again: the card says it
    was withdrawn and why, and shows no probability or reasons from it (NEWS2, not withdrawn, still counts)."""
    body = hook_request(record, prefetch=full_prefetch(record))
    first = the_card(call(client, body))
    path = first["links"][0]["url"].replace("http://localhost", "")
    withdrawn = client.post(f"{path}/$withdraw", json={"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueString": "charted on the wrong patient"}]})
    assert withdrawn.status_code == 200, withdrawn.json
    card = the_card(call(client, {**body, "hookInstance": str(uuid.uuid4())}))
    assert card["links"][0]["url"] == first["links"][0]["url"]           # the same assessment, as it stands
    assert card["summary"] == "Deterioration: not assessed (the assessment of these data was withdrawn as " \
                              "entered in error)"
    detail = card["detail"]
    assert "Entered in error: charted on the wrong patient" in detail
    assert not re.search(r"\d+%", detail) and "**Top contributing inputs**" not in detail
    assert "**NEWS2**" in detail and card["indicator"] == "critical"   # the septic course's NEWS2 stands
    korean = the_card(call(client, {**body, "hookInstance": str(uuid.uuid4())}, **{"Accept-Language": "ko"}))
    assert "입력 오류로 철회됨" in korean["summary"] and "withdrawn" not in korean["detail"]


def test_a_hook_encounter_that_has_ended_is_not_the_assessments(client: FlaskClient, record: dict[str, Any]) -> None:
    """The hook names a visit that ended two days ago: the assessment now is not labelled with it (it would
    read data from after it); the card comes as without an encounter, never an error."""
    ended = datetime.now(timezone.utc) - timedelta(days=2)
    record["encounter"]["status"] = "finished"
    record["encounter"]["period"] = {"start": (ended - timedelta(days=3)).isoformat(), "end": ended.isoformat()}
    card = the_card(call(client, hook_request(record, prefetch=full_prefetch(record))))
    stored = client.get(card["links"][0]["url"].replace("http://localhost", "")).json
    assert stored.get("encounter") != {"reference": f"Encounter/{record['encounter']['id']}"}


def test_partial_prefetch_fetches_only_what_is_missing(client: FlaskClient, record: dict[str, Any]) -> None:
    prefetch = full_prefetch(record)
    del prefetch["observations"]
    with responses.RequestsMock() as rsps:
        mock_server(rsps, record)
        rsps.remove(responses.GET, f"{FHIR}/Patient/{record['patient']['id']}")
        rsps.remove(responses.GET, f"{FHIR}/Encounter/{record['encounter']['id']}")
        card = the_card(call(client, hook_request(record, prefetch=prefetch)))
        # Only the Observation search (one POST _search with every code of the mapping in its form).
        assert [c.request.url for c in rsps.calls] == [f"{FHIR}/Observation/_search"]
        assert f"patient={record['patient']['id']}" in rsps.calls[0].request.body.decode()
    assert "fetched from the EHR's FHIR server" in card["detail"]
    assert re.search(r"Based on 20 observation", card["detail"])


def test_missing_prefetch_is_fetched_with_the_access_token(client: FlaskClient, record: dict[str, Any]) -> None:
    with responses.RequestsMock() as rsps:
        mock_server(rsps, record)
        card = the_card(call(client, hook_request(record)))
        urls = [c.request.url.split("?")[0] for c in rsps.calls]
        assert urls[:2] == [f"{FHIR}/Patient/{record['patient']['id']}", f"{FHIR}/Encounter/{record['encounter']['id']}"]
        assert urls[2:] == [f"{FHIR}/Observation/_search"]
    assert "Based on 20 observation" in card["detail"]


def test_missing_prefetch_without_fhir_server_is_412(client: FlaskClient, record: dict[str, Any]) -> None:
    prefetch = full_prefetch(record)
    del prefetch["observations"]
    response = call(client, hook_request(record, prefetch=prefetch, server=False))
    assert response.status_code == 412
    assert response.json["issue"][0]["expression"] == ["prefetch.observations"]
    # A failed call is audited too, with the patient it asked about (fhir_ai had read part of the record).
    (event,) = audit_events(client, f"patient=Patient/{record['patient']['id']}&subtype=cds-hooks")
    assert event["outcome"] == "4" and event["outcomeDesc"].startswith("412 POST /cds-services/deterioration")
    bad = client.post("/cds-services/deterioration/feedback", json={"feedback": [{
        "card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z"}]})
    assert bad.status_code == 422
    refused = [e for e in audit_events(client, "subtype=cds-hooks&outcome=4")
               if e["outcomeDesc"].startswith("422 POST /cds-services/deterioration/feedback")]
    assert len(refused) == 1


def test_operation_outcome_prefetch_is_fetched_again(client: FlaskClient, record: dict[str, Any]) -> None:
    prefetch = full_prefetch(record)
    prefetch["observations"] = {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "timeout", "diagnostics": "lab system did not answer"}]}
    with responses.RequestsMock() as rsps:
        mock_server(rsps, record)
        rsps.remove(responses.GET, f"{FHIR}/Patient/{record['patient']['id']}")
        rsps.remove(responses.GET, f"{FHIR}/Encounter/{record['encounter']['id']}")
        card = the_card(call(client, hook_request(record, prefetch=prefetch)))
        assert [c.request.url for c in rsps.calls] == [f"{FHIR}/Observation/_search"]
    assert "lab system did not answer" in card["detail"] and "Based on 20 observation" in card["detail"]


def test_operation_outcome_without_fhir_server_is_412(client: FlaskClient, record: dict[str, Any]) -> None:
    prefetch = full_prefetch(record)
    prefetch["patient"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "exception"}]}
    assert call(client, hook_request(record, prefetch=prefetch, server=False)).status_code == 412


@pytest.mark.parametrize("status, attempts", [(401, 1), (500, 3), (503, 3)])
def test_ehr_server_failing_is_412(client: FlaskClient, record: dict[str, Any], status: int, attempts: int,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cds_prefetch, "sleep", lambda seconds: None)    # 500 and 503 are retried: no real wait
    prefetch = full_prefetch(record)
    del prefetch["observations"]
    with responses.RequestsMock() as rsps:
        rsps.post(f"{FHIR}/Observation/_search", status=status, json={"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "security", "diagnostics": "token rejected"}]})
        response = call(client, hook_request(record, prefetch=prefetch))
        assert len(rsps.calls) == attempts
    assert response.status_code == 412
    assert "cannot obtain Observations" in response.json["issue"][0]["diagnostics"]


def test_patient_unknown_at_the_ehr_is_412(client: FlaskClient, record: dict[str, Any]) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{FHIR}/Patient/{record['patient']['id']}", status=404)
        response = call(client, hook_request(record))
    assert response.status_code == 412


def test_null_patient_is_412(client: FlaskClient, record: dict[str, Any]) -> None:
    prefetch = full_prefetch(record)
    prefetch["patient"] = None
    assert call(client, hook_request(record, prefetch=prefetch, server=False)).status_code == 412


def test_null_observations_give_a_not_assessed_card_never_an_empty_answer(
        client: FlaskClient, record: dict[str, Any]) -> None:
    prefetch = full_prefetch(record)
    prefetch["observations"] = None
    card = the_card(call(client, hook_request(record, prefetch=prefetch, server=False)))
    assert "not assessed" in card["summary"] and card["indicator"] == "warning"
    assert "The EHR reported no Observation" in card["detail"]
    assert card["links"][0]["url"].endswith(card["links"][0]["url"].rsplit("/", 1)[1])


def test_paginated_prefetch_is_completed_from_the_server(client: FlaskClient, record: dict[str, Any]) -> None:
    prefetch = full_prefetch(record)
    first, rest = record["observations"][:5], record["observations"][5:]
    prefetch["observations"] = searchset(first, link=[{"relation": "next", "url": f"{FHIR}/Observation?page=2"}])
    with responses.RequestsMock() as rsps:
        rsps.get(f"{FHIR}/Observation", json=searchset(rest))
        card = the_card(call(client, hook_request(record, prefetch=prefetch)))
    assert "Based on 20 observation" in card["detail"]


# -- bad requests -----------------------------------------------------------------------------------

def test_another_patients_observation_in_prefetch_is_refused(client: FlaskClient, record: dict[str, Any]) -> None:
    prefetch = full_prefetch(record)
    prefetch["observations"]["entry"][3]["resource"]["subject"] = {"reference": "Patient/someone-else"}
    response = call(client, hook_request(record, prefetch=prefetch, server=False))
    assert response.status_code == 400
    assert response.json["issue"][0]["expression"] == ["prefetch.observations.entry[3].resource.subject"]


@pytest.mark.parametrize("change, expression", [
    (lambda b: b.update(hook="order-sign"), "hook"),
    (lambda b: b.pop("hookInstance"), "hookInstance"),
    (lambda b: b["context"].update(userId="not a reference"), "context.userId"),
    (lambda b: b["context"].pop("patientId"), "context.patientId"),
    (lambda b: b.pop("fhirServer"), "fhirServer"),                         # cds-r-1
])
def test_invalid_hook_requests(client: FlaskClient, record: dict[str, Any], change: Any, expression: str) -> None:
    body = hook_request(record, prefetch=full_prefetch(record))
    change(body)
    response = call(client, body)
    assert response.status_code == 400 and response.json["issue"][0]["expression"] == [expression]


def test_library_contexts_are_accepted(client: FlaskClient, record: dict[str, Any]) -> None:
    """The hooks library's patient-view contexts (with and without encounterId) pass our checks."""
    for name in ("patient-view-01-examples.json", "patient-view-02-examples.json"):
        context = json.loads((LIBRARY / name).read_text())["context"]
        body = hook_request(record, prefetch=full_prefetch(record), server=False)
        body["context"] = {**context, "patientId": record["patient"]["id"]}
        if "encounterId" in context:
            body["context"]["encounterId"] = record["encounter"]["id"]
        the_card(call(client, body))


# -- patient-view without encounterId (OPTIONAL for that hook) --------------------------------------------

def with_history(record: dict[str, Any]) -> dict[str, Any]:
    """The record plus an earlier, finished stay of the same patient (listed first, as a search may)."""
    earlier = datetime.now(timezone.utc) - timedelta(days=40)
    old = f.encounter(record["patient"]["id"], status="finished",
                      period={"start": f.fhir_time(earlier), "end": f.fhir_time(earlier + timedelta(days=3))})
    return {**record, "encounters": [old, record["encounter"]]}


def discovery_prefetch(record: dict[str, Any]) -> dict[str, Any]:
    """What an EHR sends for our patient-view discovery templates: the encounters as a searchset."""
    return {"patient": record["patient"], "encounter": searchset(record.get("encounters") or [record["encounter"]]),
            "observations": searchset(record["observations"])}


def assessed_encounter(client: FlaskClient, card: dict[str, Any]) -> str | None:
    stored = client.get(card["links"][0]["url"].replace("http://localhost", "")).json
    return (stored.get("encounter") or {}).get("reference")


@responses.activate
def test_the_librarys_patient_view_example_without_encounter_id_is_assessed(client: FlaskClient) -> None:
    """hooks library patient-view example 01, verbatim (no encounterId), plus the prefetch our discovery asks
    for: a card for the patient's current encounter, nothing fetched, no 412."""
    context = json.loads((LIBRARY / "patient-view-01-examples.json").read_text())["context"]
    assert "encounterId" not in context
    patient = f.patient(id=context["patientId"])
    encounter = f.encounter(patient["id"])
    now = datetime.now(timezone.utc) - timedelta(minutes=5)
    record = with_history({"patient": patient, "encounter": encounter,
                           "observations": f.sepsis_observations(patient["id"], encounter["id"], now)})
    templates = {s["id"]: s["prefetch"] for s in client.get("/cds-services").json["services"]}["deterioration"]
    # The EHR fills every template from this context (a token naming an absent field could not be filled,
    # and the EHR would omit that key) and answers each query from the record.
    answers = {"Patient": record["patient"], "Encounter": searchset(record["encounters"]),
               "Observation": searchset(record["observations"])}
    prefetch = {}
    for key, template in templates.items():
        query = re.sub(r"{{context\.(\w+)}}", lambda m: context[m.group(1)], template)
        assert "{{" not in query and (query.startswith("Patient/1288992") or "patient=1288992" in query), query
        # (Every observation is in the first Observation key's answer; another such key would repeat them.)
        prefetch[key] = searchset([]) if key.startswith("observations-") else answers[query.split("/")[0].split("?")[0]]
    body = {"hookInstance": str(uuid.uuid4()), "hook": "patient-view", "context": context, "prefetch": prefetch}
    card = the_card(call(client, body))
    assert len(responses.calls) == 0
    assert "Based on 20 observation" in card["detail"]
    assert assessed_encounter(client, card) == f"Encounter/{encounter['id']}"


def test_without_encounter_id_the_patients_encounters_are_fetched(client: FlaskClient, record: dict[str, Any]) -> None:
    record = with_history(record)
    body = hook_request(record, prefetch=full_prefetch(record))
    del body["context"]["encounterId"], body["prefetch"]["encounter"]
    with responses.RequestsMock() as rsps:
        rsps.get(f"{FHIR}/Encounter", json=searchset(record["encounters"]))
        card = the_card(call(client, body))
        assert [c.request.url.split("?")[0] for c in rsps.calls] == [f"{FHIR}/Encounter"]
        assert f"patient={record['patient']['id']}" in rsps.calls[0].request.url
    assert assessed_encounter(client, card) == f"Encounter/{record['encounter']['id']}"
    # ... and with neither the key nor a fhirServer, the data the model needs cannot be had: 412 (2.0.1).
    body = hook_request(record, prefetch=full_prefetch(record), server=False)
    del body["context"]["encounterId"], body["prefetch"]["encounter"]
    response = call(client, body)
    assert response.status_code == 412 and response.json["issue"][0]["expression"] == ["prefetch.encounter"]


def test_encounter_id_missing_from_the_prefetched_search_is_read_not_replaced(
        client: FlaskClient, record: dict[str, Any]) -> None:
    """context.encounterId names a stay the EHR's search did not return: fhir_ai reads it (or, without a
    fhirServer, answers 412) rather than assess the patient's other stays."""
    record = with_history(record)
    prefetch = discovery_prefetch(record)
    prefetch["encounter"] = searchset(record["encounters"][:1])           # only the old, finished stay
    with responses.RequestsMock() as rsps:
        rsps.get(f"{FHIR}/Encounter/{record['encounter']['id']}", json=record["encounter"])
        card = the_card(call(client, hook_request(record, prefetch=copy.deepcopy(prefetch))))
        assert len(rsps.calls) == 1
    assert assessed_encounter(client, card) == f"Encounter/{record['encounter']['id']}"
    response = call(client, hook_request(record, prefetch=prefetch, server=False))
    assert response.status_code == 412 and response.json["issue"][0]["expression"] == ["prefetch.encounter"]
    assert "context.encounterId" in response.json["issue"][0]["diagnostics"]


def test_a_paginated_encounter_search_is_completed(client: FlaskClient, record: dict[str, Any]) -> None:
    record = with_history(record)
    prefetch = discovery_prefetch(record)
    prefetch["encounter"] = searchset(record["encounters"][:1],
                                      link=[{"relation": "next", "url": f"{FHIR}/Encounter?page=2"}])
    body = hook_request(record, prefetch=prefetch)
    del body["context"]["encounterId"]
    with responses.RequestsMock() as rsps:
        rsps.get(f"{FHIR}/Encounter", json=searchset(record["encounters"][1:]))
        card = the_card(call(client, body))
        assert len(rsps.calls) == 1
    assert assessed_encounter(client, card) == f"Encounter/{record['encounter']['id']}"


# -- language ------------------------------------------------------------------------------------------

def test_korean_when_the_request_asks_for_it(client: FlaskClient, record: dict[str, Any]) -> None:
    body = hook_request(record, prefetch=full_prefetch(record), server=False)
    card = the_card(call(client, body, **{"Accept-Language": "ko-KR,ko;q=0.9,en;q=0.5"}))
    assert "악화 위험" in card["summary"] and "주요 기여 입력값" in card["detail"]
    english = the_card(call(client, copy.deepcopy(body), **{"Accept-Language": "fr, en;q=0.8"}))
    assert "Deterioration risk" in english["summary"]
    body["extension"] = {"fhir-ai.language": "ko"}
    assert "악화" in the_card(call(client, body))["summary"]


def test_site_default_language(settings_overrides: dict[str, Any], record: dict[str, Any]) -> None:
    app = create_app({**settings_overrides, "cds_language": "ko"})
    try:
        client = app.test_client()
        body = hook_request(record, prefetch=full_prefetch(record), server=False)
        assert "악화" in the_card(call(client, body))["summary"]
        assert "Deterioration" in the_card(call(client, body, **{"Accept-Language": "en"}))["summary"]
    finally:
        app.extensions["fhir_ai"].close()


# -- triage --------------------------------------------------------------------------------------------

def ed_record(ed: bool = True) -> dict[str, Any]:
    arrived = datetime.now(timezone.utc) - timedelta(minutes=20)
    patient = f.patient()
    encounter = f.encounter(patient["id"], period={"start": f.fhir_time(arrived)},
                            reasonCode=[{"text": "chest pain"}],
                            **{"class": {"system": f.ACT_CODE, "code": "EMER" if ed else "IMP"}})
    when = arrived + timedelta(minutes=5)
    observations = [f.observation(patient["id"], code, value, unit, when)
                    for code, value, unit in (("8867-4", 118, "/min"), ("9279-1", 26, "/min"),
                                              ("8480-6", 92, "mm[Hg]"), ("8310-5", 38.4, "Cel"),
                                              ("59408-5", 91, "%"))]
    observations.append(f.observation(patient["id"], "11283-9", 0, "1", when, valueQuantity=None,
                                      valueCodeableConcept={"coding": [{
                                          "system": "https://fhir-ai.invalid/CodeSystem/ktas-level", "code": "3"}]}))
    for obs in observations:
        obs.pop("valueQuantity", None) if obs.get("valueCodeableConcept") else None
    return {"patient": patient, "encounter": encounter, "observations": observations}


def test_triage_on_encounter_start(app: Flask, client: FlaskClient) -> None:
    if "triage" not in app.extensions["fhir_ai"].registry.models:
        pytest.skip("no trained triage model in this tree")
    record = ed_record()
    body = hook_request(record, prefetch=full_prefetch(record), server=False, hook="encounter-start")
    card = the_card(call(client, body, "triage"))
    assert "KTAS" in card["summary"] and "triage" in card["source"]["label"]
    assert "**Nurse KTAS** (next to the model): 3" in card["detail"]
    # "Probability" on the card is the model's class probability (the unweighted extension), not the decision
    # rule's urgency-weighted score in probabilityDecimal.
    stored = client.get(card["links"][0]["url"].replace("http://localhost", "")).json
    levels = [p for p in stored["prediction"] if p["outcome"]["coding"][0]["system"].endswith("ktas-level")]
    shown = re.search(r"\*\*Probability\*\* of each KTAS level \([^)]*\): (.*)", card["detail"]).group(1)
    for level in levels:
        code = level["outcome"]["coding"][0]["code"]
        plain = next(e["valueDecimal"] for e in level["extension"] if e["url"].endswith("/class-probability"))
        percent = "<1%" if plain < 0.005 else f"{round(plain * 100)}%"
        assert f"{code}: {percent}" in shown, (code, plain, shown)
    predicted = next(p for p in levels if p["qualitativeRisk"]["coding"][0]["code"] == "high")
    plain = next(e["valueDecimal"] for e in predicted["extension"] if e["url"].endswith("/class-probability"))
    assert card["summary"].split("), ")[1].startswith("<1%" if plain < 0.005 else f"{round(plain * 100)}%")


def test_a_nurse_ktas_sent_as_a_number_is_named_not_ignored(app: Flask, client: FlaskClient) -> None:
    """The nurse's KTAS as valueInteger (the mapping reads coded levels): the card says it was not used and
    why, rather than 'not recorded' with nothing said."""
    if "triage" not in app.extensions["fhir_ai"].registry.models:
        pytest.skip("no trained triage model in this tree")
    record = ed_record()
    nurse = record["observations"][-1]
    nurse.pop("valueCodeableConcept")
    nurse["valueInteger"] = 4
    body = hook_request(record, prefetch=full_prefetch(record), server=False, hook="encounter-start")
    card = the_card(call(client, body, "triage"))
    assert f"Observation/{nurse['id']} (nurse_ktas): valueInteger given where valueCodeableConcept is read" \
        in card["detail"]


def test_triage_outside_the_ed_says_not_assessed(app: Flask, client: FlaskClient) -> None:
    if "triage" not in app.extensions["fhir_ai"].registry.models:
        pytest.skip("no trained triage model in this tree")
    record = ed_record(ed=False)
    body = hook_request(record, prefetch=full_prefetch(record), server=False)
    card = the_card(call(client, body, "triage-ed-view"))
    assert "not an emergency department encounter" in card["summary"] and card["indicator"] == "info"


def test_triage_ed_view_without_encounter_id_assesses_the_active_ed_visit(app: Flask, client: FlaskClient) -> None:
    if "triage" not in app.extensions["fhir_ai"].registry.models:
        pytest.skip("no trained triage model in this tree")
    record = ed_record()
    pid = record["patient"]["id"]
    # Also on the record: a stay that started later but is not an ED visit, and an old finished ED visit.
    ward = f.encounter(pid, period={"start": f.fhir_time(datetime.now(timezone.utc) - timedelta(minutes=10))})
    old_ed = f.encounter(pid, status="finished",
                         period={"start": "2020-01-01T00:00:00Z", "end": "2020-01-01T05:00:00Z"},
                         **{"class": {"system": f.ACT_CODE, "code": "EMER"}})
    prefetch = {**full_prefetch(record), "encounter": searchset([old_ed, record["encounter"], ward])}
    body = hook_request(record, prefetch=prefetch, server=False)
    del body["context"]["encounterId"]
    card = the_card(call(client, body, "triage-ed-view"))
    assert "KTAS" in card["summary"]
    assert assessed_encounter(client, card) == f"Encounter/{record['encounter']['id']}"
    # No active ED visit: "not assessed", whichever stay is current.
    prefetch["encounter"] = searchset([old_ed, ward])
    body = hook_request(record, prefetch=prefetch, server=False)
    del body["context"]["encounterId"]
    card = the_card(call(client, body, "triage-ed-view"))
    assert "not an emergency department encounter" in card["summary"]


# -- feedback ------------------------------------------------------------------------------------------

SPEC_FEEDBACK = ("spec-19-example-suggestion-accepted.json",
                 "spec-20-example-overridden-guidance-without-overridereason.json",
                 "spec-21-example-overridden-guidance-with-overridereason.json")


def issue_cards(app: Flask, *card_uuids: str, service: str = "deterioration", client: str | None = None) -> None:
    """Cards with these uuids, as if the service had answered a hook with them."""
    app.extensions["fhir_ai"].store.add_card_events([
        {"event": "issued", "service_id": service, "card_uuid": u, "patient_id": "p1", "client": client}
        for u in card_uuids], description="cards issued by the test")


def test_feedback_on_cards_never_issued_is_refused(client: FlaskClient) -> None:
    """The spec's feedback examples, verbatim, name cards this service never issued: 422 naming the card."""
    for name in SPEC_FEEDBACK:
        response = client.post("/cds-services/deterioration/feedback", json=spec(name))
        assert response.status_code == 422, response.json
        assert response.json["issue"][0]["code"] == "not-found"
        assert response.json["issue"][0]["expression"] == ["feedback[0].card"]
    assert client.get("/audit/cds-cards").json["total"] == 0


def test_spec_feedback_examples_are_stored_for_auditors(app: Flask, client: FlaskClient) -> None:
    issue_cards(app, *(spec(name)["feedback"][0]["card"] for name in SPEC_FEEDBACK))
    for name in SPEC_FEEDBACK:
        response = client.post("/cds-services/deterioration/feedback", json=spec(name))
        assert response.status_code == 200, response.json
    events = client.get("/audit/cds-cards?service=deterioration&event=accepted").json["events"] + \
        client.get("/audit/cds-cards?service=deterioration&event=overridden").json["events"]
    assert [e["event"] for e in events] == ["accepted", "overridden", "overridden"]
    assert events[0]["acceptedSuggestions"] == ["e56e1945-20b3-4393-8503-a1a20fd73152"]
    assert events[0]["patient"] == "p1"
    assert events[2]["overrideReason"]["code"] == "d7ecf885"
    assert events[2]["userComment"] == "A comment entered by the clinician."
    assert events[2]["outcomeTimestamp"] == "2020-12-11T00:00:00Z"


def test_feedback_is_all_or_nothing(app: Flask, client: FlaskClient) -> None:
    """One entry naming a card never issued (here, or by another service) and none of the request is stored."""
    known, other_service, unknown = (str(uuid.uuid4()) for _ in range(3))
    issue_cards(app, known)
    issue_cards(app, other_service, service="triage-ed-view")
    entry = {"outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z"}
    for i, bad in ((1, unknown), (2, other_service)):
        items = [{**entry, "card": known}, {**entry, "card": known}, {**entry, "card": known}]
        items[i]["card"] = bad
        response = client.post("/cds-services/deterioration/feedback", json={"feedback": items})
        assert response.status_code == 422 and response.json["issue"][0]["expression"] == [f"feedback[{i}].card"]
        # the same words whether the card exists elsewhere or not at all
        assert response.json["issue"][0]["diagnostics"] == f"service deterioration issued no card {bad}"
    assert [e["event"] for e in client.get("/audit/cds-cards").json["events"]] == ["issued", "issued"]


def test_a_contradicting_outcome_is_kept_as_history(app: Flask, client: FlaskClient) -> None:
    """2.0.1: a card may get feedback several times ("a card once ignored could later be acted upon"; clients
    report "each of these distinct end-user interactions"): accepted, then overridden, are both kept."""
    card = str(uuid.uuid4())
    issue_cards(app, card)
    accepted = {"card": card, "outcome": "accepted", "outcomeTimestamp": "2026-01-01T10:00:00Z",
                "acceptedSuggestions": [{"id": str(uuid.uuid4())}]}
    overridden = {"card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-01T10:05:00Z"}
    for item in (accepted, overridden):
        assert client.post("/cds-services/deterioration/feedback", json={"feedback": [item]}).status_code == 200
    events = client.get(f"/audit/cds-cards?card={card}").json["events"]
    assert [(e["event"], e.get("outcomeTimestamp")) for e in events] == [
        ("issued", None), ("accepted", "2026-01-01T10:00:00Z"), ("overridden", "2026-01-01T10:05:00Z")]


def test_feedback_is_linked_to_the_card_patient_and_assessment(client: FlaskClient, record: dict[str, Any]) -> None:
    card = the_card(call(client, hook_request(record, prefetch=full_prefetch(record), server=False)))
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-25T10:05:31Z",
                              "overrideReason": {"reason": card["overrideReasons"][2], "userComment": "on it"}}]}
    assert client.post("/cds-services/deterioration/feedback", json=feedback).status_code == 200
    events = client.get(f"/audit/cds-cards?card={card['uuid']}").json["events"]
    assert [e["event"] for e in events] == ["issued", "overridden"]
    assert events[1]["patient"] == record["patient"]["id"]
    assert events[1]["assessment"] == card["links"][0]["url"].rsplit("/", 1)[1]
    assert events[1]["overrideReason"]["code"] == "managed"
    # reading the cards is an AuditEvent naming the patient they are about
    pid = record["patient"]["id"]
    audited = client.get(f"/AuditEvent?patient=Patient/{pid}&subtype=search-type&_count=50").json.get("entry", [])
    assert any(any(x.get("what", {}).get("reference") == f"Patient/{pid}" for x in e["resource"].get("entity", []))
               for e in audited), "the card read is not found by AuditEvent?patient="


def test_card_events_are_in_the_audit_chain(app: Flask, client: FlaskClient, record: dict[str, Any],
                                            runner: Any, tmp_path: Path) -> None:
    """Cards issued and feedback are each recorded by an AuditEvent (with the sha256 of every row), so
    `audit verify` finds a card event altered, removed or added behind the trail's back, as for assessments;
    a clinician's override (which may be the reason of a dispute) cannot be rewritten unseen."""
    card = the_card(call(client, hook_request(record, prefetch=full_prefetch(record), server=False)))
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-25T19:05:31+09:00",
                              "overrideReason": {"reason": card["overrideReasons"][2], "userComment": "on it"}}]}
    assert client.post("/cds-services/deterioration/feedback", json=feedback).status_code == 200
    store = app.extensions["fhir_ai"].store
    with store.engine.connect() as connection:
        ids = [row[0] for row in connection.execute(sql_text("SELECT id FROM cds_card_event ORDER BY id"))]
    assert len(ids) == 2
    for row_id, description in zip(ids, ("1 card(s) issued", "feedback on 1 card(s)")):
        (event,) = audit_events(client, f"entity:identifier=https://fhir-ai.invalid/cds-card-event|{row_id}")
        assert event["action"] == "C" and event["outcomeDesc"].endswith(description)
        assert {"reference": f"Patient/{record['patient']['id']}"} in [e["what"] for e in event["entity"]]

    def verified() -> Any:
        return runner.invoke(main, ["audit", "verify", "--no-progress"])

    result = verified()
    assert result.exit_code == 0 and "2 CDS card events checked" in result.output, result.output
    exported = runner.invoke(main, ["audit", "export", "--format", "csv", "--out", str(tmp_path / "csv"),
                                    "--no-progress"])
    assert exported.exit_code == 0, exported.output
    assert f"https://fhir-ai.invalid/cds-card-event|{ids[1]}" in (tmp_path / "csv" / "AuditEvent.csv").read_text()
    tampering = [
        ("UPDATE cds_card_event SET override_code = 'patient-declined' WHERE event = 'overridden'",
         f"CDS card event {ids[1]}: content differs from what the audit trail recorded (altered)"),
        (f"DELETE FROM cds_card_event WHERE id = {ids[0]}",
         f"CDS card event {ids[0]}: recorded in the audit trail but no longer stored (removed)"),
        ("INSERT INTO cds_card_event (event, service_id, card_uuid, received_at) "
         "VALUES ('accepted', 'deterioration', 'x', '2026-11-25 10:00:00')",
         "stored without an audit event (added behind the trail's back)"),
    ]
    for statement, problem in tampering:
        with store.engine.begin() as connection:
            connection.execute(sql_text(statement))
        result = verified()
        assert result.exit_code == 1 and problem in result.output, result.output


def test_a_removed_card_event_is_found_though_its_id_is_given_again(app: Flask, runner: Any) -> None:
    """SQLite gives the highest id again once its row is gone: the next card event takes the removed one's id.
    The two events recording that id give it away (PostgreSQL never gives an id twice: 'removed')."""
    issue_cards(app, str(uuid.uuid4()))
    issue_cards(app, str(uuid.uuid4()))
    with app.extensions["fhir_ai"].store.engine.begin() as connection:
        last = connection.execute(sql_text("SELECT MAX(id) FROM cds_card_event")).scalar_one()
        connection.execute(sql_text(f"DELETE FROM cds_card_event WHERE id = {last}"))
    issue_cards(app, str(uuid.uuid4()))
    result = runner.invoke(main, ["audit", "verify", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert (f"CDS card event {last}: recorded by 2 audit events" in result.output
            or f"CDS card event {last}: recorded in the audit trail but no longer stored" in result.output)


@pytest.mark.parametrize("coding, field", [
    ({"system": 5, "code": "x"}, "system"), ({"code": "x", "display": 7}, "display"),
    ({"code": {"c": "x"}}, "code"), ({"system": {"s": 1}, "code": "x"}, "system"),
])
def test_an_override_reason_of_the_wrong_types_is_refused(app: Flask, client: FlaskClient, runner: Any,
                                                          coding: dict[str, Any], field: str) -> None:
    """Stored as sent, a number would read back as text (the trail would call the row altered for ever) and
    an object could not be stored at all (a 500): 400 naming the field, nothing stored."""
    card = str(uuid.uuid4())
    issue_cards(app, card)
    response = client.post("/cds-services/deterioration/feedback", json={"feedback": [{
        "card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z",
        "overrideReason": {"reason": coding}}]})
    assert response.status_code == 400, response.json
    assert response.json["issue"][0]["expression"] == [f"feedback[0].overrideReason.reason.{field}"]
    long = client.post("/cds-services/deterioration/feedback", json={"feedback": [{
        "card": card, "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z",
        "overrideReason": {"reason": {"code": "x", "display": "d" * 600, "system": "s" * 600}}}]})
    assert long.status_code == 200, long.json                       # cut to the columns, on every database
    assert runner.invoke(main, ["audit", "verify", "--no-progress"]).exit_code == 0


def test_card_events_stored_before_they_were_audited_are_counted_apart(app: Flask, runner: Any) -> None:
    """A database from before card events were audited: its rows have no event to be checked by; verify
    says so and still passes (rows stored after the first audited one must have theirs)."""
    with app.extensions["fhir_ai"].store.engine.begin() as connection:
        connection.execute(sql_text("INSERT INTO cds_card_event (event, service_id, card_uuid, received_at) "
                                    "VALUES ('issued', 'deterioration', 'old', '2026-11-01 10:00:00')"))
    issue_cards(app, str(uuid.uuid4()))
    result = runner.invoke(main, ["audit", "verify", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 CDS card events checked" in result.output and "note: 1 CDS card event(s) were stored before" \
        in result.output


@pytest.mark.parametrize("item, expression", [
    ({"card": str(uuid.uuid4()), "outcome": "dismissed", "outcomeTimestamp": "2026-01-01T00:00:00Z"},
     "feedback[0].outcome"),                                                             # cds-fb-1
    ({"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z"},
     "feedback[0].acceptedSuggestions"),                                                 # cds-fb-2
    ({"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z",
      "overrideReason": {}}, "feedback[0].overrideReason"),                              # cds-fb-3
    ({"card": "not-a-uuid", "outcome": "overridden", "outcomeTimestamp": "2026-01-01T00:00:00Z"}, "feedback[0].card"),
    ({"card": str(uuid.uuid4()), "outcome": "overridden"}, "feedback[0].outcomeTimestamp"),
])
def test_invalid_feedback(client: FlaskClient, item: dict[str, Any], expression: str) -> None:
    response = client.post("/cds-services/deterioration/feedback", json={"feedback": [item]})
    assert response.status_code == 400 and response.json["issue"][0]["expression"] == [expression]
    assert client.get("/audit/cds-cards").json["total"] == 0


# -- the EHR's JWT at the endpoints --------------------------------------------------------------------

EHR_KEY = ec.generate_private_key(ec.SECP384R1())
EHR = "https://ehr.example.org/"


def ehr_token(aud: str, jti: str | None = None) -> str:
    now = int(time.time())
    return jwt.encode({"iss": EHR, "aud": aud, "exp": now + 60, "iat": now, "jti": jti or str(uuid.uuid4())},
                      EHR_KEY, algorithm="ES384", headers={"kid": "ehr-1", "typ": "JWT"})


@pytest.fixture
def secured(settings_overrides: dict[str, Any]) -> Any:
    jwk = {**ECAlgorithm.to_jwk(EHR_KEY.public_key(), as_dict=True), "kid": "ehr-1", "alg": "ES384"}
    app = create_app({**settings_overrides, "cds_require_jwt": True, "cds_public_url": "https://cds.example.org/",
                      "cds_issuers": json.dumps({EHR: {"jwks": {"keys": [jwk]}}})})
    yield app.test_client()
    app.extensions["fhir_ai"].close()


def test_service_call_needs_a_valid_jwt(secured: FlaskClient, record: dict[str, Any]) -> None:
    body = hook_request(record, prefetch=full_prefetch(record), server=False)
    missing = call(secured, body)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer error=")
    url = "https://cds.example.org/cds-services/deterioration"
    token = ehr_token(url)
    the_card(call(secured, body, Authorization=f"Bearer {token}"))
    replay = call(secured, body, Authorization=f"Bearer {token}")
    assert replay.status_code == 401 and "already used" in replay.json["issue"][0]["diagnostics"]
    other_service = call(secured, body, Authorization=f"Bearer {ehr_token(url.replace('deterioration', 'triage'))}")
    assert other_service.status_code == 401 and "aud must be exactly" in other_service.json["issue"][0]["diagnostics"]
    events = secured.get("/audit/cds-cards").json["events"]
    assert [e["client"] for e in events] == [EHR]
    # Each refusal is an AuditEvent, like the API's own 401s (the token itself is never in it).
    refusals = [e["resource"] for e in secured.get("/AuditEvent?outcome=4&_count=50").json.get("entry", [])]
    said = [r.get("outcomeDesc", "") for r in refusals]
    assert len([d for d in said if d.startswith("401 POST /cds-services/deterioration")]) == 3, said
    assert not any(token in d for d in said)


def test_feedback_needs_a_jwt_for_the_feedback_url(secured: FlaskClient) -> None:
    body = spec("spec-20-example-overridden-guidance-without-overridereason.json")
    issue_cards(secured.application, body["feedback"][0]["card"], client=EHR)
    url = "https://cds.example.org/cds-services/deterioration/feedback"
    wrong = secured.post("/cds-services/deterioration/feedback", json=body,
                         headers={"Authorization": f"Bearer {ehr_token(url.rsplit('/', 1)[0])}"})
    assert wrong.status_code == 401
    ok = secured.post("/cds-services/deterioration/feedback", json=body,
                      headers={"Authorization": f"Bearer {ehr_token(url)}"})
    assert ok.status_code == 200


def test_feedback_on_a_card_issued_to_another_ehr_is_refused(secured: FlaskClient) -> None:
    body = spec("spec-20-example-overridden-guidance-without-overridereason.json")
    issue_cards(secured.application, body["feedback"][0]["card"], client="https://other-ehr.example.org/")
    url = "https://cds.example.org/cds-services/deterioration/feedback"
    response = secured.post("/cds-services/deterioration/feedback", json=body,
                            headers={"Authorization": f"Bearer {ehr_token(url)}"})
    assert response.status_code == 422 and response.json["issue"][0]["expression"] == ["feedback[0].card"]
    assert "to this EHR" in response.json["issue"][0]["diagnostics"]


def audit_events(client: FlaskClient, query: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in client.get(f"/AuditEvent?{query}&_count=100").json.get("entry", [])]


def test_the_hooks_user_is_a_second_agent_of_the_audit_event(secured: FlaskClient, record: dict[str, Any],
                                                              runner: Any) -> None:
    """context.userId is recorded as the user the EHR says is acting (requestor); the EHR, which signed the
    call, stays the first agent; AuditEvent?agent= finds the user and the chain still verifies."""
    url = "https://cds.example.org/cds-services/deterioration"
    body = hook_request(record, prefetch=full_prefetch(record), server=False)
    body["context"]["userId"] = "Practitioner/123"
    the_card(call(secured, body, Authorization=f"Bearer {ehr_token(url)}"))
    found = audit_events(secured, "agent=Practitioner/123")
    assert found and {e["subtype"][-1]["code"] for e in found} == {"assess", "cds-hooks"}   # stored, cards issued
    for event in found:
        ehr, user = event["agent"]
        assert ehr["who"]["identifier"]["value"] == EHR and ehr["requestor"] is False
        assert user == {"type": user["type"], "who": {"reference": "Practitioner/123"}, "requestor": True}
        assert user["type"]["coding"][0]["code"] == "humanuser"
        assert any(x["what"].get("reference") == f"Patient/{record['patient']['id']}" for x in event["entity"])
    # Calls whose userId fhir_ai does not take as a user: another type, an id FHIR would not accept, or
    # an unsigned call (no EHR vouches for it). They are answered, and audited with the EHR alone.
    for user_id in ("Device/123", "Practitioner/a_b", "Practitioner/" + "x" * 65, "Practitioner/.."):
        other = hook_request(record, prefetch=full_prefetch(record), server=False)
        other["context"]["userId"] = user_id
        the_card(call(secured, other, Authorization=f"Bearer {ehr_token(url)}"))
    newline = hook_request(record, prefetch=full_prefetch(record), server=False)
    newline["context"]["userId"] = "Practitioner/123\n"
    answer = call(secured, newline, Authorization=f"Bearer {ehr_token(url)}")
    assert answer.status_code == 400 and answer.json["issue"][0]["expression"] == ["context.userId"]
    others = [e for e in audit_events(secured, "subtype=assess") if e["id"] not in {f["id"] for f in found}]
    assert len(others) >= 3 and all(len(e["agent"]) == 1 and e["agent"][0]["requestor"] is True for e in others)
    verified = runner.invoke(main, ["audit", "verify", "--no-progress"])
    assert verified.exit_code == 0 and "OK" in verified.output, verified.output


def provenances(client: FlaskClient, query: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in client.get(f"/Provenance?{query}&_count=100").json.get("entry", [])]


def test_the_hooks_user_is_named_in_the_provenance_and_another_users_repeat_only_audited(
        secured: FlaskClient, record: dict[str, Any]) -> None:
    """The Provenance of what a signed call stored names context.userId: an agent (Provenance?agent= finds it)
    and the EHR's onBehalfOf. The same call for another user finds the same assessments (their ids come from
    their content): nothing new is stored, and the repeat is in the AuditEvents under that user."""
    url = "https://cds.example.org/cds-services/deterioration"
    body = hook_request(record, prefetch=full_prefetch(record), server=False)
    body["context"]["userId"] = "Practitioner/123"
    the_card(call(secured, body, Authorization=f"Bearer {ehr_token(url)}"))
    mine = provenances(secured, "agent=Practitioner/123")
    assert mine and len(mine) == len(provenances(secured, f"patient={record['patient']['id']}"))  # model, NEWS2
    for prov in mine:
        Provenance.model_validate(prov)
        author, ehr, user = prov["agent"]
        assert author["who"]["reference"] == "#model"
        assert ehr["who"]["identifier"]["value"] == EHR and ehr["onBehalfOf"] == {"reference": "Practitioner/123"}
        assert user["who"] == {"reference": "Practitioner/123"} and user["type"]["coding"][0]["code"] == "humanuser"

    again = hook_request(record, prefetch=full_prefetch(record), server=False)
    again["context"]["userId"] = "Practitioner/456"
    the_card(call(secured, again, Authorization=f"Bearer {ehr_token(url)}"))
    assert provenances(secured, "agent=Practitioner/456") == []
    assert provenances(secured, f"patient={record['patient']['id']}") == mine
    repeats = audit_events(secured, "agent=Practitioner/456&subtype=assess")
    assert len(repeats) == len(mine)
    assert all(e["action"] == "R" and e["outcomeDesc"].startswith("repeated request") for e in repeats)
    assert ({e["entity"][0]["what"]["reference"] for e in repeats}
            == {p["target"][0]["reference"] for p in mine})


def test_an_unsigned_calls_user_is_not_recorded(client: FlaskClient, record: dict[str, Any]) -> None:
    body = hook_request(record, prefetch=full_prefetch(record), server=False)
    body["context"]["userId"] = "Practitioner/123"
    the_card(call(client, body))
    assert audit_events(client, "agent=Practitioner/123") == []
    assert all(len(e["agent"]) == 1 for e in audit_events(client, "subtype=assess"))
    assert provenances(client, "agent=Practitioner/123") == []
    assert all(len(p["agent"]) == 2 for p in provenances(client, f"patient={record['patient']['id']}"))


def test_a_triage_not_assessed_is_audited_with_the_user(secured: FlaskClient) -> None:
    if "triage" not in secured.application.extensions["fhir_ai"].registry.models:
        pytest.skip("no trained triage model in this tree")
    record = ed_record(ed=False)
    body = hook_request(record, prefetch=full_prefetch(record), server=False)
    body["context"]["userId"] = "PractitionerRole/123"
    url = "https://cds.example.org/cds-services/triage-ed-view"
    card = the_card(call(secured, body, "triage-ed-view", Authorization=f"Bearer {ehr_token(url)}"))
    assert "not an emergency department encounter" in card["summary"]
    found = audit_events(secured, "agent=PractitionerRole/123")
    # the record read (nothing assessed) and the card issued
    assert sorted(e["action"] for e in found) == ["C", "E"]
    read = next(e for e in found if e["action"] == "E")
    assert read["entity"][0]["what"]["reference"] == f"Patient/{record['patient']['id']}"
    assert {e["agent"][0]["who"]["identifier"]["value"] for e in found} == {EHR}


@pytest.mark.parametrize("iss", ["病院", "https://ehr.example.org/\r\nX-Evil: 1"])
def test_a_token_quoting_what_a_header_cannot_hold_is_still_a_401(secured: FlaskClient, record: dict[str, Any],
                                                                  iss: str) -> None:
    """The refusal quotes the token's issuer; the WWW-Authenticate header keeps printable ASCII only (a
    non-Latin-1 or CR/LF there made gunicorn answer 500 with an HTML page)."""
    now = int(time.time())
    forged = jwt.encode({"iss": iss, "aud": "https://cds.example.org/cds-services/deterioration", "exp": now + 60,
                         "iat": now, "jti": str(uuid.uuid4())}, EHR_KEY, algorithm="ES384",
                        headers={"kid": "ehr-1", "typ": "JWT"})
    refused_ = call(secured, hook_request(record, prefetch=full_prefetch(record), server=False),
                    Authorization=f"Bearer {forged}")
    assert refused_.status_code == 401 and refused_.json["resourceType"] == "OperationOutcome"
    header = refused_.headers["WWW-Authenticate"]
    assert header.isascii() and "\r" not in header and "\n" not in header
    assert header.startswith('Bearer error="invalid_token", error_description="')


@pytest.mark.parametrize("query", ["_offset=100000000000000000000", "_count=-1", "_count=9999999999999999999999",
                                   "_offset=x"])
def test_the_card_audit_refuses_counts_and_offsets_out_of_range(client: FlaskClient, query: str) -> None:
    answer = client.get(f"/audit/cds-cards?{query}")
    assert answer.status_code == 400 and answer.json["issue"][0]["expression"] == [query.split("=")[0]]
