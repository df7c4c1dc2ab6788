"""Push mode: POST /$assess with a Parameters holding a Bundle — nothing pulled, same answer and storage."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from fhir_ai.app import create_app
from fhir_ai.config import DEMO_HOSPITAL

try:
    from . import databases
except ImportError:
    import databases  # type: ignore[no-redef]

AS_OF = "2026-11-20T08:00:00Z"
PATIENT = "demo-005"
HOSPITAL = "https://hospital.invalid/fhir"


def demo_record(patient_id: str = PATIENT) -> list[dict[str, Any]]:
    """Every resource of one demo-hospital patient, read straight from the NDJSON files."""
    out = []
    for kind in ("Patient", "Encounter", "Observation"):
        for line in (Path(DEMO_HOSPITAL) / f"{kind}.ndjson").read_bytes().splitlines():
            resource = orjson.loads(line)
            ref = (resource.get("subject") or {}).get("reference")
            if resource["id"] == patient_id if kind == "Patient" else ref == f"Patient/{patient_id}":
                out.append(resource)
    return out


def parameters(resources: list[dict[str, Any]], *, as_of: str | None = AS_OF, bundle_type: str = "collection",
               extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    params: list[dict[str, Any]] = [{"name": "bundle", "resource": {
        "resourceType": "Bundle", "type": bundle_type, "entry": [{"resource": r} for r in resources]}}]
    if as_of:
        params.append({"name": "asOf", "valueDateTime": as_of})
    return {"resourceType": "Parameters", "parameter": params + (extra or [])}


def push(client: FlaskClient, body: dict[str, Any], **headers: str) -> Any:
    return client.post("/$assess", json=body, headers={"Content-Type": "application/fhir+json", **headers})


@pytest.fixture
def hospital_down() -> Iterator[responses.RequestsMock]:
    """No hospital at all: any request to it would fail the test."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def push_app(settings_overrides: dict[str, Any], tmp_path: Path) -> Iterator[Flask]:
    """The same service configured against a hospital server that is never called (its own database)."""
    with databases.fresh_database(tmp_path / "push") as database_url:
        app = create_app({**settings_overrides, "source_url": HOSPITAL, "database_url": database_url})
        yield app
        app.extensions["fhir_ai"].close()


def resources_of(bundle: dict[str, Any], kind: str = "RiskAssessment") -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_push_gives_the_pull_answer_without_pulling(client: FlaskClient, push_app: Flask,
                                                    hospital_down: responses.RequestsMock) -> None:
    pulled = client.post(f"/Patient/{PATIENT}/$assess", json={"resourceType": "Parameters", "parameter": [
        {"name": "asOf", "valueDateTime": AS_OF}]}, headers={"Content-Type": "application/fhir+json"})
    assert pulled.status_code == 200
    pushed_client = push_app.test_client()
    pushed = push(pushed_client, parameters(demo_record()))
    assert pushed.status_code == 200, pushed.json
    assert len(hospital_down.calls) == 0
    strip = [{k: v for k, v in r.items() if k != "meta"} for r in resources_of(pulled.json)]
    assert [{k: v for k, v in r.items() if k != "meta"} for r in resources_of(pushed.json)] == strip
    # Same storage: readable, searchable, and a repeat stores nothing new.
    first = resources_of(pushed.json)[0]
    assert pushed_client.get(f"/RiskAssessment/{first['id']}").status_code == 200
    again = push(pushed_client, parameters(demo_record()))
    assert resources_of(again.json)[0]["meta"] == first["meta"]
    assert pushed_client.get(f"/RiskAssessment?patient={PATIENT}").json["total"] == len(strip)


def test_references_through_the_patients_full_url(client: FlaskClient) -> None:
    record = demo_record()
    body = parameters(record, bundle_type="transaction")
    entries = body["parameter"][0]["resource"]["entry"]
    entries[0]["fullUrl"] = "urn:uuid:8f3c9a52-5a7e-4f0e-9a55-2f1d0c6f7a10"
    for entry in entries[1:]:
        entry["resource"]["subject"] = {"reference": "urn:uuid:8f3c9a52-5a7e-4f0e-9a55-2f1d0c6f7a10"}
    response = push(client, body)
    assert response.status_code == 200, response.json
    assert resources_of(response.json)[0]["subject"] == {"reference": f"Patient/{PATIENT}"}


def test_observation_of_another_patient_is_refused_with_its_path(client: FlaskClient) -> None:
    record = demo_record()
    record[3] = copy.deepcopy(record[3])
    record[3]["subject"] = {"reference": "Patient/demo-006"}
    response = push(client, parameters(record))
    assert response.status_code == 400
    outcome = response.json
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Parameters.parameter[0].resource.entry[3].resource.subject"]
    assert "another patient" in outcome["issue"][0]["diagnostics"]
    assert client.get(f"/RiskAssessment?patient={PATIENT}").json["total"] == 0     # nothing stored


def mutate(path: str, value: Any) -> Any:
    def change(record: list[dict[str, Any]]) -> None:
        index, _, field = path.partition(".")
        if value is KeyError:
            record[int(index)].pop(field)
        else:
            record[int(index)][field] = value
    return change


@pytest.mark.parametrize("change, expression, text", [
    (mutate("5.subject", None), "Parameters.parameter[0].resource.entry[5].resource.subject", "must reference"),
    (mutate("4.id", KeyError), "Parameters.parameter[0].resource.entry[4].resource.id", "needs an id"),
    (mutate("6.status", "bogus"), "Parameters.parameter[0].resource.entry[6].resource.status", "status"),
    (mutate("6.valueQuantity", {"value": "lots"}),
     "Parameters.parameter[0].resource.entry[6].resource.valueQuantity.value", "Observation"),
    (lambda r: r.append({"resourceType": "Condition", "id": "c1"}),
     "Parameters.parameter[0].resource.entry[{last}].resource.resourceType", "not used here"),
    (lambda r: r.append(dict(r[0], id="demo-006")), "Parameters.parameter[0].resource.entry[{last}].resource",
     "exactly one Patient"),
    (lambda r: r.append(dict(r[7])), "Parameters.parameter[0].resource.entry[{last}].resource", "appears twice"),
    (lambda r: r.pop(0), "Parameters.parameter[0].resource.entry", "exactly one Patient"),
])
def test_invalid_bundle_content(client: FlaskClient, change: Any, expression: str, text: str) -> None:
    record = copy.deepcopy(demo_record())
    change(record)
    response = push(client, parameters(record))
    assert response.status_code == 400, response.json
    issue = response.json["issue"][0]
    assert issue["expression"] == [expression.format(last=len(record) - 1)]
    assert text in issue["diagnostics"]


def test_other_resource_types_are_skipped_when_lenient(client: FlaskClient) -> None:
    record = demo_record() + [{"resourceType": "Condition", "id": "c1"}]
    response = push(client, parameters(record), Prefer="handling=lenient")
    assert response.status_code == 200
    warnings = resources_of(response.json, "OperationOutcome")[0]["issue"]
    assert any(w.get("expression") == [f"Parameters.parameter[0].resource.entry[{len(record) - 1}]"
                                       ".resource"] for w in warnings)


@pytest.mark.parametrize("body, expression", [
    ({"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": AS_OF}]},
     "Parameters.parameter"),
    ({"resourceType": "Parameters", "parameter": [{"name": "bundle", "resource": {"resourceType": "Patient"}}]},
     "Parameters.parameter[0].resource"),
    ({"resourceType": "Parameters", "parameter": [{"name": "bundle", "resource": {
        "resourceType": "Bundle", "type": "document", "entry": []}}]}, "Parameters.parameter[0].resource.type"),
])
def test_invalid_parameters(client: FlaskClient, body: dict[str, Any], expression: str) -> None:
    response = push(client, body)
    assert response.status_code == 400 and response.json["issue"][0]["expression"] == [expression]


def test_other_parameters_keep_their_own_index(client: FlaskClient) -> None:
    body = parameters(demo_record(), as_of=None)
    body["parameter"].insert(0, {"name": "asOf", "valueDateTime": "yesterday"})
    response = push(client, body)
    assert response.status_code == 400
    assert response.json["issue"][0]["expression"] == ["Parameters.parameter[0].valueDateTime"]
    body["parameter"].append({"name": "colour", "valueString": "red"})
    body["parameter"][0]["valueDateTime"] = AS_OF
    response = push(client, body)
    assert response.json["issue"][0]["expression"] == ["Parameters.parameter[2].name"]


def test_not_a_parameters_body(client: FlaskClient) -> None:
    response = push(client, {"resourceType": "Bundle", "type": "collection", "entry": []})
    assert response.status_code == 400 and response.json["issue"][0]["expression"] == ["resourceType"]


def test_capability_statement_and_operation_definition(client: FlaskClient) -> None:
    rest = client.get("/metadata").json["rest"][0]
    assert {"name": "assess", "definition": "https://fhir-ai.invalid/OperationDefinition/assess-bundle"} \
        in rest["operation"]
    assert "/cds-services" in rest["documentation"]
    definition = client.get("/OperationDefinition/assess-bundle").json
    assert definition["system"] is True and definition["instance"] is False
    assert definition["parameter"][0]["name"] == "bundle"
