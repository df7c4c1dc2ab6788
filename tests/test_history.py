"""Assessments are never changed in place: versions, vread, history, withdrawal as entered-in-error, Provenance."""
from __future__ import annotations

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.provenance import Provenance

from fhir_ai import codes

AS_OF = "2026-11-20T08:00:00Z"
FHIR = "application/fhir+json"


def assess(client, patient="demo-005"):
    body = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": AS_OF}]}
    response = client.post(f"/Patient/{patient}/$assess", json=body, content_type=FHIR)
    assert response.status_code == 200, response.json
    return response.json["entry"][0]["resource"]


def withdraw(client, rid, reason="assessed the wrong patient", headers=None):
    body = {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": reason}]}
    return client.post(f"/RiskAssessment/{rid}/$withdraw", json=body, content_type=FHIR, headers=headers or {})


def test_every_assessment_has_provenance_after_the_ai_transparency_approach(client):
    ra = assess(client)
    bundle = client.get(f"/Provenance?target=RiskAssessment/{ra['id']}").json
    assert bundle["total"] == 1
    prov = bundle["entry"][0]["resource"]
    Provenance.model_validate(prov)
    assert prov["target"] == [{"reference": f"RiskAssessment/{ra['id']}/_history/1"}]
    device = prov["contained"][0]
    method = ra["method"]["coding"][0]
    assert device["resourceType"] == "Device" and device["version"] == [{"value": method["version"]}]
    assert device["identifier"][0] == {"system": codes.MODEL_VERSION_SYSTEM,
                                       "value": f"deterioration|{method['version']}"}
    author = next(a for a in prov["agent"] if a["type"]["coding"][0]["code"] == "author")
    assert author["who"]["reference"] == "#model"
    enterer = next(a for a in prov["agent"] if a["type"]["coding"][0]["code"] == "enterer")
    assert enterer["who"]["identifier"]["value"] == "test-suite"
    inputs = {e["what"]["reference"] for e in prov["entity"] if "reference" in e["what"]}
    assert inputs == {b["reference"] for b in ra["basis"]}
    card = [e for e in prov["entity"] if "identifier" in e["what"]]
    assert card[0]["what"]["identifier"]["value"] == f"deterioration|{method['version']}"
    # by id, and by patient / entity
    assert client.get(f"/Provenance/{prov['id']}").json == prov
    observation = ra["basis"][0]["reference"]
    assert prov["id"] in {e["resource"]["id"] for e in client.get(f"/Provenance?entity={observation}").json["entry"]}
    assert client.get("/Provenance?patient=demo-005").json["total"] == 2      # the model's and NEWS2's


def test_withdrawal_is_a_new_version_and_history_keeps_the_old_one(client):
    ra = assess(client, "demo-004")
    response = withdraw(client, ra["id"], headers={"If-Match": 'W/"1"'})
    assert response.status_code == 200, response.json
    assert response.json["status"] == "entered-in-error"
    assert response.json["meta"]["versionId"] == "2"
    assert response.headers["ETag"] == 'W/"2"'
    assert response.json["note"][-1]["text"] == "Entered in error: assessed the wrong patient"

    current = client.get(f"/RiskAssessment/{ra['id']}")
    assert current.json["status"] == "entered-in-error" and current.headers["ETag"] == 'W/"2"'
    first = client.get(f"/RiskAssessment/{ra['id']}/_history/1").json
    assert first["status"] == "final" and first["prediction"] == ra["prediction"]
    history = client.get(f"/RiskAssessment/{ra['id']}/_history").json
    Bundle.model_validate(history)
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    assert [e["request"]["method"] for e in history["entry"]] == ["PUT", "POST"]

    # The withdrawal has its own Provenance: who, why, which version it replaces.
    provs = client.get(f"/Provenance?target=RiskAssessment/{ra['id']}&_sort=recorded").json["entry"]
    nullify = provs[-1]["resource"]
    assert nullify["activity"]["coding"][0]["code"] == "NULLIFY"
    assert nullify["reason"][0]["text"] == "assessed the wrong patient"
    assert nullify["entity"][0]["what"]["reference"] == f"RiskAssessment/{ra['id']}/_history/1"
    # Still found by search (an auditor must see it), with its status.
    found = client.get(f"/RiskAssessment?_id={ra['id']}").json["entry"][0]["resource"]
    assert found["status"] == "entered-in-error"
    # Withdrawing again changes nothing.
    again = withdraw(client, ra["id"])
    assert again.status_code == 200 and again.json["meta"]["versionId"] == "2"


def test_withdrawal_errors(client):
    ra = assess(client, "demo-002")
    assert withdraw(client, "no-such-id").status_code == 404
    conflict = withdraw(client, ra["id"], headers={"If-Match": 'W/"7"'})
    assert conflict.status_code == 412 and conflict.json["resourceType"] == "OperationOutcome"
    missing = client.post(f"/RiskAssessment/{ra['id']}/$withdraw", json={"resourceType": "Parameters"},
                          content_type=FHIR)
    assert missing.status_code == 400
    assert client.get(f"/RiskAssessment/{ra['id']}").json["meta"]["versionId"] == "1"


def test_vread_and_history_of_unknown_versions(client):
    ra = assess(client, "demo-003")
    assert client.get(f"/RiskAssessment/{ra['id']}/_history/2").status_code == 404
    assert client.get(f"/RiskAssessment/{ra['id']}/_history/x").status_code == 400
    assert client.get("/RiskAssessment/nope/_history").status_code == 404
    assert client.put(f"/RiskAssessment/{ra['id']}", json=ra).status_code == 405
    assert client.delete(f"/RiskAssessment/{ra['id']}").status_code == 405
