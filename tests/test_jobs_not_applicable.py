"""A model that is not for the patient's visit (mapping scoring.encounter_classes: the triage model is for
EMER encounters) is counted "not applicable", apart from "insufficient data", in batch jobs (manifest,
progress, the job's patient rows) and in bulk scoring (BulkStats, its log line and the CLI's line).

The demo hospital's twelve patients are all inpatients (class IMP), so the triage model applies to none
of them; demo-010 has nothing charted, so the deterioration model has too little data for that one.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from fhir_ai.bulk import bulk_assess
from fhir_ai.cli import main
from fhir_ai.config import DEFAULT_MAPPINGS, DEFAULT_MODELS, DEMO_HOSPITAL
from fhir_ai.jobs import JobStore
from fhir_ai.jobs.tables import JobItemRow
from fhir_ai.mapping import load_directory
from fhir_ai.models.registry import ModelRegistry

# The batch-job fixtures (demo hospital folder with wards, tasks run eagerly) and helpers of test_jobs.
try:
    from .test_jobs import (AS_OF, WARD, eager, hospital, jc, job_app, kick_off,  # noqa: F401
                            parameters, store_of)
except ImportError:
    from test_jobs import (AS_OF, WARD, eager, hospital, jc, job_app, kick_off,  # type: ignore  # noqa: F401
                           parameters, store_of)


def test_a_triage_job_on_inpatients_counts_them_not_applicable_not_insufficient(jc: FlaskClient,
                                                                                 job_app: Flask) -> None:
    manifest = jc.get(kick_off(jc, "/Group/ward-a/$assess", parameters(asOf=AS_OF, model="triage"))).get_json()
    assert manifest["patients"] == 4
    assert (manifest["assessed"], manifest["insufficientData"], manifest["notApplicable"], manifest["failed"]) == \
        (0, 0, 4, 0)
    # Each patient's cancelled RiskAssessment is still listed (it says why it was not assessed) ...
    assert sorted(o["patient"] for o in manifest["output"]) == [f"Patient/{p}" for p in WARD]
    assert {o["status"] for o in manifest["output"]} == {"not-applicable"}
    said = jc.get(manifest["output"][0]["url"].removeprefix("http://localhost")).get_json()
    assert said["status"] == "cancelled"
    assert any(n["text"].startswith("Not assessed: not applicable.") for n in said["note"])
    # ... and the job's patient rows hold the new status (String(16), no CHECK constraint: no migration).
    with store_of(job_app).session() as session:
        assert set(session.scalars(select(JobItemRow.status))) == {"not-applicable"}


def test_insufficient_data_and_not_applicable_are_told_apart_in_one_hospital(jc: FlaskClient) -> None:
    deterioration = jc.get(kick_off(jc, "/$assess-all")).get_json()
    assert (deterioration["patients"], deterioration["insufficientData"], deterioration["notApplicable"]) == (12, 1, 0)
    assert [o["patient"] for o in deterioration["output"] if o["status"] == "insufficient"] == \
        ["Patient/demo-010", "Patient/demo-010"]          # its model's RiskAssessment and NEWS2
    triage = jc.get(kick_off(jc, "/$assess-all", parameters(asOf=AS_OF, model="triage"))).get_json()
    assert (triage["patients"], triage["insufficientData"], triage["notApplicable"]) == (12, 0, 12)


def test_progress_names_the_not_applicable_patients(jc: FlaskClient, job_app: Flask) -> None:
    jobs = JobStore(store_of(job_app))
    jobs.create("job-na", kind="group", scope="ward-a", as_of=datetime(2026, 11, 20, tzinfo=timezone.utc),
                request={"request": "x"}, requested_by="test-suite", requested_role="admin")
    jobs.start("job-na")
    jobs.expand("job-na", ["p1", "p2", "p3", "p4"])
    for patient, status in (("p1", "assessed"), ("p2", "insufficient"), ("p3", "not-applicable")):
        jobs.record("job-na", patient, status, [f"RiskAssessment/{patient}"])
    response = jc.get("/jobs/job-na")
    assert response.status_code == 202 and response.headers["X-Progress"] == "3/4 patients"
    assert response.get_json()["issue"][0]["diagnostics"] == (
        "running: 3/4 patients (1 assessed, 1 insufficient data, 1 not applicable, 0 failed)")


def _cancelled(reason: str, model: str = "deterioration") -> dict[str, Any]:
    return {"resourceType": "RiskAssessment", "id": "x", "status": "cancelled", "method": _method(model),
            "note": [{"text": "Inputs: none"}, {"text": f"Not assessed: {reason}"}]}


def _method(model: str) -> dict[str, Any]:
    return {"coding": [{"system": "https://fhir-ai.invalid/model", "code": model}]}


def test_each_models_outcome_is_read_from_its_own_assessment() -> None:
    from fhir_ai.jobs.tasks import assessment_status, model_outcomes, outcomes, patient_status
    assert assessment_status({"resourceType": "RiskAssessment", "status": "final"}) == "assessed"
    assert assessment_status(_cancelled("insufficient data. Found 1 of the core inputs")) == "insufficient"
    assert assessment_status(_cancelled("not applicable. The triage model is for encounters of class EMER")) \
        == "not-applicable"
    assert assessment_status({"resourceType": "RiskAssessment", "status": "cancelled"}) == "insufficient"
    final = {"resourceType": "RiskAssessment", "status": "final", "method": _method("deterioration")}
    news2 = {"resourceType": "RiskAssessment", "status": "cancelled", "method": _method("news2")}
    triage = _cancelled("not applicable. The triage model is for encounters of class EMER", "triage")
    resources = [triage, final, news2]
    assert model_outcomes(["triage", "deterioration"], resources) == ["not-applicable", "assessed"]
    assert model_outcomes(["deterioration", "triage"], resources) == ["assessed", "not-applicable"]
    assert model_outcomes([], [final, news2]) == ["assessed"]        # none named: the default model's, first
    # One outcome per model in the patient's row: a word for one model, a letter each for more.
    assert patient_status(["not-applicable"]) == "not-applicable"
    assert patient_status(["not-applicable", "assessed"]) == "=na"
    for status in ("assessed", "failed", "=na", "=ff", "=ai"):
        assert patient_status(outcomes(status)) == status
    assert outcomes("pending") == []


def _model_of(jc: FlaskClient, url: str) -> tuple[str, str]:
    resource = jc.get(url.removeprefix("http://localhost")).get_json()
    return resource["method"]["coding"][0]["code"], resource["status"]


def test_a_two_model_job_labels_each_assessment_by_its_own_outcome(jc: FlaskClient) -> None:
    body = parameters(asOf=AS_OF, model="triage")
    body["parameter"].append({"name": "model", "valueCode": "deterioration"})
    manifest = jc.get(kick_off(jc, "/Group/ward-a/$assess", body)).get_json()
    labels: dict[str, set[str]] = {}
    for entry in manifest["output"]:
        model, status = _model_of(jc, entry["url"])
        labels.setdefault(model, set()).add(entry["status"])
        assert (status == "cancelled") == (entry["status"] != "assessed"), (model, status, entry)
    assert labels == {"triage": {"not-applicable"}, "deterioration": {"assessed"}, "news2": {"assessed"}}


def test_a_two_model_job_counts_each_patient_once_per_model_in_any_order(jc: FlaskClient, job_app: Flask) -> None:
    keys = ("patients", "assessed", "insufficientData", "notApplicable", "failed")
    answers = []
    for models in (("triage", "deterioration"), ("deterioration", "triage")):
        body = parameters(asOf=AS_OF)
        body["parameter"] += [{"name": "model", "valueCode": m} for m in models]
        status_url = kick_off(jc, "/$assess-all", body)
        answers.append([jc.get(status_url).get_json()[k] for k in keys])
        listed = next(j for j in jc.get("/jobs").get_json()["jobs"] if status_url.endswith(j["job"]))
        assert [listed[k] for k in keys] == answers[-1]                  # the list counts alike
    # 12 inpatients: triage applies to none, deterioration has too little data for demo-010 (as bulk-assess)
    assert answers == [[12, 11, 1, 12, 0]] * 2
def test_bulk_stats_log_and_cli_count_not_applicable_apart(tmp_path: Path, runner: Any, caplog: Any) -> None:
    registry = ModelRegistry.load(DEFAULT_MODELS, load_directory(DEFAULT_MAPPINGS))
    out = tmp_path / "ra.ndjson"
    with caplog.at_level(logging.INFO, logger="fhir_ai.bulk"):
        stats = bulk_assess(DEMO_HOSPITAL, out, registry, models=["deterioration", "triage"], progress=False)
    assert (stats.patients, stats.assessed, stats.insufficient, stats.not_applicable) == (12, 11, 1, 12)
    assert "12 patients (11 assessed, 1 insufficient data, 12 not applicable)" in caplog.text
    triage = [r for r in map(orjson.loads, out.read_bytes().splitlines())
              if r["method"]["coding"][0]["code"] == "triage"]
    assert len(triage) == 12 and {r["status"] for r in triage} == {"cancelled"}
    result = runner.invoke(main, ["bulk-assess", "--input", str(DEMO_HOSPITAL), "--output",
                                  str(tmp_path / "cli.ndjson"), "--model", "triage", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "12 patients (0 assessed, 0 insufficient data, 12 not applicable)" in result.output
