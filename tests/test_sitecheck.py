"""`fhir-ai check-site`: CapabilityStatement, SMART configuration and mapping codes of a site."""
from __future__ import annotations

import copy
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
import responses

from fhir_ai.cli import main
from fhir_ai.config import DEFAULT_MAPPINGS, load_settings
from fhir_ai.mapping import load_directory
from fhir_ai.sitecheck import check_site, observed_codes, render, scope_covers

BASE = "https://ehr.example.org/fhir"
LOINC = "http://loinc.org"


def resource(rtype: str, params: list[str], interactions: list[str], **extra: Any) -> dict[str, Any]:
    return {"type": rtype, "interaction": [{"code": c} for c in interactions],
            "searchParam": [{"name": p, "type": "token"} for p in params], **extra}


CAPABILITY: dict[str, Any] = {
    "resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
    "fhirVersion": "4.0.1", "software": {"name": "Hospital FHIR", "version": "9.1"},
    "rest": [{"mode": "server", "resource": [
        resource("Patient", ["_id", "identifier"], ["read", "search-type"]),
        resource("Encounter", ["patient", "date"], ["read", "search-type"]),
        resource("Observation", ["patient", "code", "date", "category"], ["read", "search-type"]),
        resource("RiskAssessment", ["subject", "identifier", "patient"],
                 ["read", "update", "search-type"], updateCreate=True),
    ], "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}]}],
}
SMART_CONFIG = {
    "token_endpoint": "https://auth.example.org/token",
    "grant_types_supported": ["client_credentials"],
    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
    "scopes_supported": ["system/*.rs", "system/RiskAssessment.write"],
}


def observation(oid: str, system: str, code: str, components: list[str] = ()) -> dict[str, Any]:
    obs: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": "final",
                           "code": {"coding": [{"system": system, "code": code}]},
                           "subject": {"reference": "Patient/p1"}}
    if components:
        obs["component"] = [{"code": {"coding": [{"system": LOINC, "code": c}]},
                             "valueQuantity": {"value": 1}} for c in components]
    return obs


SAMPLE = [observation("o1", LOINC, "8867-4"), observation("o2", LOINC, "9279-1"),
          observation("o3", LOINC, "85354-9", ["8480-6", "8462-4"]),
          observation("o4", "urn:local", "HR-LOCAL"), observation("o5", LOINC, "8867-4")]


def stub(rsps: responses.RequestsMock, capability: dict[str, Any] = CAPABILITY,
         smart: dict[str, Any] | None = SMART_CONFIG, observations: list[dict[str, Any]] = SAMPLE) -> None:
    rsps.get(f"{BASE}/metadata", json=capability)
    if smart is None:
        rsps.get(f"{BASE}/.well-known/smart-configuration", status=404)
    else:
        rsps.get(f"{BASE}/.well-known/smart-configuration", json=smart)
    rsps.get(f"{BASE}/Observation", json={"resourceType": "Bundle", "type": "searchset",
                                          "entry": [{"resource": o, "search": {"mode": "match"}}
                                                    for o in observations]})


def checks(report) -> dict[str, Any]:
    return {c.item: c for c in report.checks}


@pytest.fixture
def settings():
    return load_settings({"mappings_dir": str(DEFAULT_MAPPINGS)})


@responses.activate
def test_a_site_with_everything_is_ready_and_codes_are_counted(settings) -> None:
    stub(responses)
    report = check_site(BASE, settings)
    assert report.ok, render(report)
    found = checks(report)
    assert found["Observation search-type (patient, code, date)"].ok
    assert found["RiskAssessment update creates (updateCreate)"].ok
    assert found["$export"].ok
    assert not found["batch"].ok and not found["batch"].required     # three requests per assessment: ready
    assert found["scope system/Observation.rs"].detail == "covered by system/*.rs"
    assert found["scope system/RiskAssessment.cu"].ok          # v1 write covers v2 cu
    assert report.sampled == 5
    det = report.codes["deterioration"]
    wanted = load_directory(str(DEFAULT_MAPPINGS))["deterioration"].query_codes()
    assert det["codes"] == len(wanted)
    # heart rate, resp rate, and SBP/DBP through the panel's components; nothing from the local code
    assert set(det["seen"]) >= {f"{LOINC}|8867-4", f"{LOINC}|9279-1", f"{LOINC}|8480-6"}
    assert "urn:local|HR-LOCAL" not in det["seen"]
    assert "heart_rate" not in det["inputsNotSeen"] and "temperature" in det["inputsNotSeen"]
    text = render(report)
    assert "result: ready" in text and "deterioration:" in text


@responses.activate
def test_missing_search_parameter_and_update_fail_the_check(settings) -> None:
    capability = copy.deepcopy(CAPABILITY)
    rest = capability["rest"][0]["resource"]
    rest[2]["searchParam"] = [p for p in rest[2]["searchParam"] if p["name"] != "date"]
    rest[3]["interaction"] = [{"code": "read"}, {"code": "search-type"}]
    stub(responses, capability=capability)
    report = check_site(BASE, settings)
    assert not report.ok
    found = checks(report)
    assert not found["Observation search-type (patient, code, date)"].ok
    assert "missing search parameters: date" in found["Observation search-type (patient, code, date)"].detail
    assert not found["RiskAssessment update"].ok
    assert "NOT ready" in render(report)


@responses.activate
def test_no_smart_configuration_is_only_a_warning_without_a_smart_client(settings) -> None:
    stub(responses, smart=None)
    report = check_site(BASE, settings)
    smart = checks(report)[".well-known/smart-configuration"]
    assert not smart.ok and not smart.required and report.ok


@responses.activate
def test_smart_gaps_fail_when_a_smart_client_is_configured(tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    settings = load_settings({"mappings_dir": str(DEFAULT_MAPPINGS), "smart_client_id": "fhir-ai",
                              "smart_private_key": pem, "smart_alg": "ES384"})
    smart = {**SMART_CONFIG, "token_endpoint_auth_signing_alg_values_supported": ["RS384"],
             "scopes_supported": ["system/Observation.read"]}
    stub(responses, smart=smart)
    responses.post(SMART_CONFIG["token_endpoint"], json={"access_token": "t", "expires_in": 300})
    report = check_site(BASE, settings)
    found = checks(report)
    assert not found["signing ES384"].ok and found["signing ES384"].required
    assert not found["signing RS384"].required                   # not the one we use
    assert found["scope system/Observation.rs"].ok
    assert not found["scope system/Patient.rs"].ok and not found["scope system/RiskAssessment.cu"].ok
    assert found["token obtained"].ok
    assert not report.ok
    # the metadata request carried the SMART token
    meta = [c for c in responses.calls if c.request.url.endswith("/metadata")][0]
    assert meta.request.headers["Authorization"] == "Bearer t"


@responses.activate
def test_unreachable_site_is_reported_not_raised(settings) -> None:
    import requests
    responses.get(f"{BASE}/.well-known/smart-configuration", body=requests.ConnectionError("down"))
    responses.get(f"{BASE}/metadata", body=requests.ConnectionError("down"))
    responses.get(f"{BASE}/Observation", body=requests.ConnectionError("down"))
    report = check_site(BASE, settings)
    assert not report.ok and not checks(report)["CapabilityStatement"].ok
    assert report.sampled == 0


@pytest.mark.parametrize("granted, needed, ok", [
    ("system/*.rs", "system/Observation.rs", True),
    ("system/*.read", "system/Observation.rs", True),          # v1 read = v2 rs
    ("system/Observation.read", "system/Observation.rs", True),
    ("system/Observation.r", "system/Observation.rs", False),   # no search
    ("system/Patient.rs", "system/Observation.rs", False),
    ("patient/*.rs", "system/Observation.rs", False),           # wrong context
    ("system/*.write", "system/RiskAssessment.cu", True),
    ("system/*.*", "system/RiskAssessment.cu", True),
    ("system/RiskAssessment.c", "system/RiskAssessment.cu", False),
    ("system/Observation.rs?category=vital-signs", "system/Observation.rs", True),
    ("launch", "system/Observation.rs", False),
])
def test_scope_covers(granted: str, needed: str, ok: bool) -> None:
    assert scope_covers(granted, needed) is ok


def test_observed_codes_include_components() -> None:
    assert observed_codes(SAMPLE[2:3]) == {(LOINC, "85354-9"), (LOINC, "8480-6"), (LOINC, "8462-4")}


@responses.activate
def test_cli_check_site_exit_codes_and_json(runner) -> None:
    stub(responses)
    ok = runner.invoke(main, ["check-site", BASE, "--json"])
    assert ok.exit_code == 0, ok.output
    body = json.loads(ok.output)
    assert body["ok"] is True and body["fhirVersion"] == "4.0.1"
    assert body["codes"]["deterioration"]["codesSeen"] >= 3
    responses.replace(responses.GET, f"{BASE}/metadata", json={**CAPABILITY, "fhirVersion": "3.0.2"})
    bad = runner.invoke(main, ["check-site", BASE])
    assert bad.exit_code == 1 and "FAIL" in bad.output and "FHIR R4" in bad.output


@responses.activate
def test_batch_in_the_capability_statement_is_reported(settings) -> None:
    capability = copy.deepcopy(CAPABILITY)
    capability["rest"][0]["interaction"] = [{"code": "batch"}]
    stub(responses, capability=capability)
    found = checks(check_site(BASE, settings))
    assert found["batch"].ok and "one request per assessment" in found["batch"].detail


def batch_site(rsps: responses.RequestsMock, answer: dict[str, Any]) -> None:
    capability = copy.deepcopy(CAPABILITY)
    capability["rest"][0]["interaction"] = [{"code": "batch"}]
    stub(rsps, capability=capability)
    patient = {"resourceType": "Patient", "id": "p1"}
    rsps.post(BASE, json=answer)
    rsps.get(f"{BASE}/Patient/p1", json=patient)
    rsps.get(f"{BASE}/Encounter", json={"resourceType": "Bundle", "type": "searchset", "entry": []})
    rsps.post(f"{BASE}/Observation/_search", json={"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": o, "search": {"mode": "match"}} for o in SAMPLE[:3]]})


def batch_response(*pages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "200 OK"}, "resource": {"resourceType": "Patient", "id": "p1"}},
        *({"response": {"status": "200 OK"}, "resource": {"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": r, "search": {"mode": "match"}} for r in page]}} for page in pages)]}


@responses.activate
def test_a_batch_that_finds_what_the_separate_requests_find_is_reported_so(settings) -> None:
    batch_site(responses, batch_response([], SAMPLE[:3]))
    found = checks(check_site(BASE, settings))
    check = found["batch answers as the separate requests do"]
    assert check.ok and not check.required and check.detail == "the same 4 resources (3 Observations) for a sampled patient"
    batch = json.loads(next(c.request.body for c in responses.calls if c.request.method == "POST"
                            and urlsplit(c.request.url).path == urlsplit(BASE).path))
    assert batch["entry"][0]["request"]["url"] == "Patient/p1"        # a patient of the sample


@responses.activate
def test_a_batch_answered_with_empty_searchsets_is_reported_as_a_problem(settings) -> None:
    batch_site(responses, batch_response([], []))
    report = check_site(BASE, settings)
    check = checks(report)["batch answers as the separate requests do"]
    assert not check.ok and "FHIR_AI_SOURCE_BATCH=false" in check.detail
    assert check.detail.startswith("the batch found 1 resources, the separate requests 4 (3 Observations)")
    assert report.ok                                # not required: fhir_ai checks batches itself
    assert "p1" not in check.detail


@responses.activate
def test_a_batch_refused_is_reported_with_its_status(settings) -> None:
    capability = copy.deepcopy(CAPABILITY)
    capability["rest"][0]["interaction"] = [{"code": "batch"}]
    stub(responses, capability=capability)
    responses.post(BASE, status=405)
    responses.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
    responses.get(f"{BASE}/Encounter", json={"resourceType": "Bundle", "type": "searchset"})
    responses.post(f"{BASE}/Observation/_search", json={"resourceType": "Bundle", "type": "searchset"})
    check = checks(check_site(BASE, settings))["batch answers as the separate requests do"]
    assert not check.ok and check.detail.startswith("the batch gave no record (HTTP 405)")
