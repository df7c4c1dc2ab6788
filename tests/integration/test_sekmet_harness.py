"""The sekmet harness starts a real FHIR server that stores, searches and keeps data across restarts."""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

try:
    from .sekmet import SekmetError, SekmetServer, SekmetUnavailable, ensure_venv, start_or_skip
except ImportError:
    from sekmet import (SekmetError, SekmetServer, SekmetUnavailable,  # type: ignore[no-redef]
                        ensure_venv, start_or_skip)

pytestmark = pytest.mark.integration

FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
LOINC = "http://loinc.org"


def _uid(prefix: str) -> str:
    # the session server is shared: every test writes under its own ids
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1950-04-02"}


def observation(oid: str, pid: str, code: str, value: float, when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": oid, "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org",
                          "code": "/min"},
    }


def risk_assessment(rid: str, pid: str, probability: float) -> dict[str, Any]:
    return {
        "resourceType": "RiskAssessment", "id": rid, "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "occurrenceDateTime": "2024-03-01T11:00:00Z",
        "method": {"coding": [{"system": "urn:fhir-ai:model", "code": "deterioration"}]},
        "prediction": [{"probabilityDecimal": probability}],
    }


def put(server: SekmetServer, resource: dict[str, Any]) -> requests.Response:
    url = server.url(f"{resource['resourceType']}/{resource['id']}")
    return requests.put(url, json=resource, headers=FHIR, timeout=30)


def ids(resources: list[dict[str, Any]]) -> list[str]:
    return sorted(r["id"] for r in resources)


def test_put_read_and_search_observations(sekmet: SekmetServer) -> None:
    pid, hr, rr = _uid("pat"), _uid("obs-hr"), _uid("obs-rr")
    assert put(sekmet, patient(pid)).status_code == 201
    assert put(sekmet, observation(hr, pid, "8867-4", 92, "2024-03-01T10:00:00Z")).status_code == 201
    assert put(sekmet, observation(rr, pid, "9279-1", 18, "2024-03-01T10:05:00Z")).status_code == 201

    assert sekmet.read("Patient", pid)["birthDate"] == "1950-04-02"
    assert sekmet.read("Observation", hr)["valueQuantity"]["value"] == 92
    assert sekmet.read("Observation", rr)["code"]["coding"][0]["code"] == "9279-1"

    response = requests.get(sekmet.url("Observation"), headers=FHIR, timeout=30,
                            params={"patient": pid, "code": f"{LOINC}|8867-4"})
    bundle = response.json()
    assert response.status_code == 200 and bundle["type"] == "searchset"
    assert bundle["total"] == 1
    assert [e["resource"]["id"] for e in bundle["entry"]] == [hr]

    both = sekmet.search("Observation", {"patient": pid, "code": f"{LOINC}|8867-4,{LOINC}|9279-1"})
    assert ids(both) == sorted([hr, rr])


def test_unknown_id_is_404_with_operation_outcome(sekmet: SekmetServer) -> None:
    response = requests.get(sekmet.url(f"Patient/{_uid('missing')}"), headers=FHIR, timeout=30)
    assert response.status_code == 404
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "not-found"


def test_search_follows_next_links(sekmet: SekmetServer) -> None:
    pid = _uid("pat")
    sekmet.load([patient(pid)] + [
        observation(f"{pid}-o{i}", pid, "8867-4", 60 + i, f"2024-03-01T10:{i:02d}:00Z") for i in range(5)])
    first = requests.get(sekmet.url("Observation"), params={"patient": pid, "_count": "2"},
                         headers=FHIR, timeout=30).json()
    assert first["total"] == 5 and len(first["entry"]) == 2
    assert any(link["relation"] == "next" for link in first["link"])
    assert len(sekmet.search("Observation", {"patient": pid, "_count": "2"})) == 5


def test_risk_assessment_put_twice_is_one_resource(sekmet: SekmetServer) -> None:
    pid, other, rid = _uid("pat"), _uid("pat"), _uid("ra")
    sekmet.load([patient(pid), patient(other), risk_assessment(_uid("ra"), other, 0.9)])

    first = put(sekmet, risk_assessment(rid, pid, 0.2))
    second = put(sekmet, risk_assessment(rid, pid, 0.3))
    assert (first.status_code, second.status_code) == (201, 200)  # update-as-create, then update
    assert second.json()["meta"]["versionId"] == "2"

    found = sekmet.search("RiskAssessment", {"subject": f"Patient/{pid}"})
    # exactly one: the parameter is registered by the launcher (unregistered it would be
    # ignored and the other patient's assessment would match too)
    assert ids(found) == [rid]
    assert found[0]["prediction"][0]["probabilityDecimal"] == 0.3
    assert ids(sekmet.search("RiskAssessment", {"patient": pid, "probability": "gt0.25"})) == [rid]
    assert sekmet.search("RiskAssessment", {"patient": pid, "probability": "gt0.5"}) == []


def test_load_is_atomic_and_raises_on_refusal(sekmet: SekmetServer) -> None:
    good, bad = _uid("pat"), _uid("pat")
    with pytest.raises(SekmetError, match="not permitted"):
        sekmet.load([patient(good), {**patient(bad), "notAnElement": 1}])
    with pytest.raises(SekmetError, match="404"):
        sekmet.read("Patient", good)  # the whole transaction was rolled back


def test_strict_search_rejects_unknown_parameter(sekmet: SekmetServer) -> None:
    with pytest.raises(SekmetError, match="Unknown search parameter"):
        sekmet.search("Observation", {"no-such-param": "x"})


def test_data_survives_restart_on_same_port(sekmet: SekmetServer) -> None:
    pid, rid = _uid("pat"), _uid("ra")
    sekmet.load([patient(pid), risk_assessment(rid, pid, 0.4)])
    base = sekmet.base_url

    sekmet.stop()
    try:
        assert not sekmet.running
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{base}/metadata", timeout=5)
    finally:
        sekmet.start()  # the server is shared by the session: always bring it back

    assert sekmet.base_url == base
    assert sekmet.read("Patient", pid)["id"] == pid
    assert ids(sekmet.search("RiskAssessment", {"subject": f"Patient/{pid}"})) == [rid]


def test_private_servers_do_not_share_data(sekmet: SekmetServer, sekmet_factory) -> None:
    pid = _uid("pat")
    sekmet.load([patient(pid)])
    private = sekmet_factory()
    assert private.base_url != sekmet.base_url
    assert private.search("Patient", {"_id": pid}) == []


def test_uninstallable_venv_fails_in_ci_and_skips_elsewhere(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(SekmetUnavailable):
        ensure_venv(blocker / "venv")
    server = SekmetServer(tmp_path / "data", venv=blocker / "venv")
    with pytest.raises(pytest.fail.Exception, match="unavailable"):
        start_or_skip(server, in_ci=True)
    with pytest.raises(pytest.skip.Exception, match="unavailable"):
        start_or_skip(server, in_ci=False)
