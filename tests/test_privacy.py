"""No patient-identifying data reaches the logs on a full request cycle: only resource ids."""
from __future__ import annotations

import json
import logging

import pytest

from fhir_ai.config import DEMO_HOSPITAL

try:
    from .credentials import ROLE_TOKENS, bearer
except ImportError:
    from credentials import ROLE_TOKENS, bearer  # type: ignore[no-redef]

FHIR = "application/fhir+json"
PATIENT = "demo-005"


def _identifying(patient_id: str) -> set[str]:
    """Names, birth date, MRN of the patient, and every measured value of theirs written as in FHIR."""
    secrets: set[str] = set()
    for line in (DEMO_HOSPITAL / "Patient.ndjson").read_text(encoding="utf-8").splitlines():
        patient = json.loads(line)
        if patient["id"] == patient_id:
            for name in patient.get("name", []):
                secrets.update([name.get("text", ""), name.get("family", ""), *name.get("given", [])])
            secrets.add(patient["birthDate"])
            secrets.update(i["value"] for i in patient.get("identifier", []))
    for line in (DEMO_HOSPITAL / "Observation.ndjson").read_text(encoding="utf-8").splitlines():
        observation = json.loads(line)
        if observation["subject"]["reference"] == f"Patient/{patient_id}":
            value = (observation.get("valueQuantity") or {}).get("value")
            if isinstance(value, float) and len(repr(value)) >= 4:     # 36.8, 0.42 ...: unmistakable
                secrets.add(repr(value))
    return {s for s in secrets if s}


def test_a_full_request_cycle_logs_no_patient_data(app, caplog):
    caplog.set_level(logging.DEBUG)
    client = app.test_client()
    ehr, auditor = bearer(ROLE_TOKENS["ehr"]), bearer(ROLE_TOKENS["auditor"])
    body = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}]}
    assessed = client.post(f"/Patient/{PATIENT}/$assess", json=body, content_type=FHIR, headers=ehr)
    assert assessed.status_code == 200
    ra = assessed.json["entry"][0]["resource"]
    secrets = _identifying(PATIENT) | {repr(ra["prediction"][0]["probabilityDecimal"])}
    secrets.add("mixed up with 김민준")
    assert len(secrets) > 10
    client.get(f"/RiskAssessment/{ra['id']}", headers=ehr)
    client.get(f"/RiskAssessment?patient={PATIENT}&probability=gt0.1", headers=auditor)
    client.get(f"/RiskAssessment/{ra['id']}/_history", headers=auditor)
    client.post(f"/RiskAssessment/{ra['id']}/$withdraw", content_type=FHIR, headers=ehr, json={
        "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "mixed up with 김민준"}]})
    client.get(f"/Provenance?patient={PATIENT}", headers=auditor)
    client.get("/AuditEvent?patient=Patient/demo-005", headers=auditor)
    client.post(f"/Patient/{PATIENT}/$assess", json=body, content_type=FHIR, headers=auditor)   # 403
    client.get(f"/RiskAssessment?patient={PATIENT}", headers={"Authorization": "Bearer wrong"})  # 401
    client.post("/Patient/nobody/$assess", json=body, content_type=FHIR, headers=ehr)            # 404

    logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert caplog.records, "the cycle should have logged something (assessments, denials)"
    assert ra["id"] in logged                                   # ids are fine, and useful
    leaked = sorted(s for s in secrets if s in logged)
    assert leaked == [], f"patient data in the logs: {leaked}"


def test_the_hospital_server_s_words_in_an_error_reach_the_caller_not_the_log(settings_overrides, caplog):
    """An upstream refusal may quote the patient (an OperationOutcome's diagnostics): the EHR that asked gets
    it in the 502's OperationOutcome; the log gets the kind of error and the statuses only."""
    import responses

    from fhir_ai.app import create_app
    base = "https://fhir.hospital.example/r4"
    settings_overrides.update(source_url=base, source_batch="false", source_retries=0)
    app = create_app(settings_overrides)
    words = "Patient Jane Q. Doe, born 1950-02-03 is flagged restricted"
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
            rsps.get(f"{base}/Patient/pat-1", status=422, json={
                "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                                                               "diagnostics": words}]})
            caplog.set_level(logging.DEBUG)
            answer = app.test_client().post("/Patient/pat-1/$assess", json={"resourceType": "Parameters"},
                                            content_type=FHIR, headers=bearer(ROLE_TOKENS["ehr"]))
        assert answer.status_code == 502 and words in answer.get_data(as_text=True)
        logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
        assert "UpstreamError (HTTP 502; the hospital server's status 422)" in logged
        assert "Jane" not in logged and "1950-02-03" not in logged
    finally:
        app.extensions["fhir_ai"].close()


def test_a_failed_statement_logs_its_sql_not_its_values(tmp_path):
    from sqlalchemy.exc import IntegrityError

    from fhir_ai.store import Store
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        with pytest.raises(IntegrityError) as raised, store.transaction() as connection:
            connection.exec_driver_sql("INSERT INTO audit_chain (id, seq, hash) VALUES (?, ?, ?)",
                                       (1, 0, "secret-value-1950-02-03"))
        assert "secret-value" not in str(raised.value) and "hidden" in str(raised.value)
    finally:
        store.close()
