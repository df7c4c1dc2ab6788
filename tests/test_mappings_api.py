"""Integrators list, check and reload mappings over HTTP; a bad mapping is reported and never loaded."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fhir.resources.R4B.provenance import Provenance

from fhir_ai.cli import main
from fhir_ai.models.registry import load_model

REPO = Path(__file__).resolve().parents[1]
FHIR = "application/fhir+json"
MAPPING_SYSTEM = "https://fhir-ai.invalid/mapping"


@pytest.fixture
def mappings_dir(tmp_path: Path, settings_overrides: dict) -> Path:
    folder = tmp_path / "mappings"
    shutil.copytree(REPO / "mappings", folder)
    settings_overrides["mappings_dir"] = str(folder)
    return folder


def test_list_check_and_reload(mappings_dir, client):
    listed = client.get("/mappings").json["mappings"]
    assert [m["model"] for m in listed] == ["deterioration", "triage"]
    assert all(m["modelVersion"] for m in listed)

    ok = client.post("/mappings/$check")
    assert ok.status_code == 200 and ok.json["issue"][0]["severity"] == "information"

    path = mappings_dir / "deterioration.yaml"
    good = path.read_text()
    path.write_text(good.replace("unit: /min", "unit: /fortnight", 1))
    bad = client.post("/mappings/$check").json
    assert bad["issue"][0]["severity"] == "error"
    assert bad["issue"][0]["expression"] == [f"{path}: inputs.heart_rate.unit"]

    refused = client.post("/mappings/$reload")
    assert refused.status_code == 422
    assert refused.json["resourceType"] == "OperationOutcome"
    # The server keeps serving what it had loaded.
    assessed = client.post("/Patient/demo-005/$assess", content_type=FHIR, json={
        "resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}]})
    assert assessed.status_code == 200

    path.write_text(good)
    add_local_heart_rate_code(path)
    reloaded = client.post("/mappings/$reload")
    assert reloaded.status_code == 200, reloaded.json
    after = {m["model"]: m for m in client.get("/mappings").json["mappings"]}
    assert after["deterioration"]["digest"] != listed[0]["digest"]
    assert after["deterioration"]["inputs"] == listed[0]["inputs"]
    pipeline = client.application.extensions["fhir_ai"]
    assert ("urn:oid:1.2.410.100", "HR-LOCAL") in pipeline.registry.mappings["deterioration"].code_index


def test_reload_refuses_a_mapping_that_no_longer_fits_its_model(mappings_dir, client):
    path = mappings_dir / "triage.yaml"
    text = path.read_text()
    path.write_text(text.replace("- input: pain\n  aggregate: first\n", "", 1))
    response = client.post("/mappings/$reload")
    assert response.status_code == 422
    assert "features do not match model triage" in response.json["issue"][0]["diagnostics"]


def test_reload_refusal_lists_every_problem_as_check_does(mappings_dir, client):
    """One issue per problem, each naming file and field (it was one issue with every problem joined)."""
    path = mappings_dir / "deterioration.yaml"
    text = path.read_text()
    path.write_text(text.replace("unit: /min", "unit: /fortnight", 1).replace("unit: Cel", "unit: degrees", 1))
    triage = mappings_dir / "triage.yaml"
    triage.write_text(triage.read_text().replace("    value: coding\n", "    value: text\n", 1))
    checked = client.post("/mappings/$check").json
    refused = client.post("/mappings/$reload")
    assert refused.status_code == 422
    assert refused.json["issue"] == checked["issue"]
    where = [issue["expression"] for issue in refused.json["issue"]]
    assert where == [[f"{path}: inputs.heart_rate.unit"], [f"{path}: inputs.temperature.unit"],
                     [f"{triage}: inputs.mental.value"]]
    for issue in refused.json["issue"]:
        assert issue["severity"] == "error" and issue["code"] == "invalid"
        assert issue["diagnostics"].startswith(issue["expression"][0] + ": ")


def test_an_input_unit_the_model_was_not_trained_on_is_neither_valid_nor_loaded(mappings_dir, client):
    """The walkthrough: heart_rate in kg passed $check and $reload, then every heart rate was dropped."""
    served = client.application.extensions["fhir_ai"].registry
    path = mappings_dir / "deterioration.yaml"
    path.write_text(path.read_text().replace("unit: /min", "unit: kg", 1))
    checked = client.post("/mappings/$check").json
    assert [issue["expression"] for issue in checked["issue"]] == [[f"{path}: inputs.heart_rate.unit"]]
    assert "trained on this input in '/min'" in checked["issue"][0]["diagnostics"]
    refused = client.post("/mappings/$reload")
    assert refused.status_code == 422 and refused.json["issue"] == checked["issue"]
    assert client.application.extensions["fhir_ai"].registry is served


def _assess(client, patient: str) -> list[dict]:
    answer = client.post(f"/Patient/{patient}/$assess", content_type=FHIR, json={
        "resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}]})
    assert answer.status_code == 200, answer.json
    return [e["resource"] for e in answer.json["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]


def _mapping_entities(client, assessment: dict) -> list[dict]:
    bundle = client.get(f"/Provenance?target=RiskAssessment/{assessment['id']}").json
    prov = bundle["entry"][0]["resource"]
    Provenance.model_validate(prov)
    return [e for e in prov["entity"] if e["what"].get("identifier", {}).get("system") == MAPPING_SYSTEM]


def test_provenance_names_the_mapping_an_assessment_was_made_with(mappings_dir, client, runner):
    """After a legitimate change (an added hospital code) the served mapping is not the trained one:
    each assessment's Provenance says which mapping file (sha256) its inputs went through."""
    trained = load_model(REPO / "fhir_ai" / "models" / "trained" / "deterioration").card["mapping"]["digest"]
    before = _assess(client, "demo-005")           # the model's RiskAssessment and its NEWS2 companion
    assert len(before) == 2
    for assessment in before:
        entities = _mapping_entities(client, assessment)
        assert entities == [{"role": "source", "what": {
            "identifier": {"system": MAPPING_SYSTEM, "value": f"deterioration|{trained}"},
            "display": f"mapping deterioration.yaml version 1 (sha256 {trained})"}}]

    add_local_heart_rate_code(mappings_dir / "deterioration.yaml")
    assert client.post("/mappings/$reload").status_code == 200
    served = {m["model"]: m["digest"] for m in client.get("/mappings").json["mappings"]}["deterioration"]
    assert served != trained
    after = _assess(client, "demo-002")
    for assessment in after:
        assert [e["what"]["identifier"]["value"] for e in _mapping_entities(client, assessment)] == [
            f"deterioration|{served}"]
    # Auditors find every assessment made through a given mapping file ...
    found = client.get(f"/Provenance?entity:identifier={MAPPING_SYSTEM}|deterioration|{served}").json
    assert sorted(e["resource"]["target"][0]["reference"] for e in found["entry"]) == sorted(
        f"RiskAssessment/{a['id']}/_history/1" for a in after)
    # ... and the audit trail still verifies.
    verified = runner.invoke(main, ["audit", "verify", "--no-progress"])
    assert verified.exit_code == 0, verified.output


def add_local_heart_rate_code(path: Path) -> None:
    text = path.read_text()
    changed = text.replace("    - system: http://loinc.org\n      code: 8867-4\n",
                           "    - system: http://loinc.org\n      code: 8867-4\n"
                           "    - system: urn:oid:1.2.410.100\n      code: HR-LOCAL\n", 1)
    assert changed != text
    path.write_text(changed)


def test_a_reload_reaches_every_worker_sharing_the_store(mappings_dir, settings_overrides, caplog):
    """Two web workers and a Celery worker's pipeline: $reload on one, the others follow."""
    from fhir_ai.app import create_app
    from fhir_ai.jobs import runtime
    from fhir_ai.config import load_settings
    settings_overrides["reload_check_interval"] = 0
    first, second = create_app(settings_overrides), create_app(settings_overrides)
    settings = load_settings(settings_overrides)
    runtime.configure(settings)
    try:
        a, b = first.test_client(), second.test_client()
        before = b.get("/mappings").json
        assert before["reload"] == 0 and "warning" not in before
        task_pipeline = runtime.pipeline()
        add_local_heart_rate_code(mappings_dir / "deterioration.yaml")
        answer = a.post("/mappings/$reload")
        assert answer.status_code == 200, answer.json
        assert "other worker processes follow" in answer.json["issue"][0]["diagnostics"]
        after = b.get("/mappings").json          # the next request on the other worker follows the reload
        assert after["reload"] == 1 and "warning" not in after
        digest = {m["model"]: m["digest"] for m in after["mappings"]}["deterioration"]
        assert digest != {m["model"]: m["digest"] for m in before["mappings"]}["deterioration"]
        assert ("urn:oid:1.2.410.100", "HR-LOCAL") in \
            second.extensions["fhir_ai"].registry.mappings["deterioration"].code_index
        assert runtime.pipeline() is task_pipeline        # the task worker's pipeline follows in place
        assert ("urn:oid:1.2.410.100", "HR-LOCAL") in task_pipeline.registry.mappings["deterioration"].code_index

        # Files broken on the other machine after the reload: it keeps what it has and says why.
        path = mappings_dir / "deterioration.yaml"
        served = second.extensions["fhir_ai"].registry
        assert a.post("/mappings/$reload").status_code == 200          # reload 2, valid here
        path.write_text(path.read_text().replace("unit: /min", "unit: /fortnight", 1))
        with caplog.at_level("ERROR", logger="fhir_ai.reloads"):
            later = b.get("/mappings").json
        assert later["reload"] == 2 and "invalid" in later["warning"]
        assert second.extensions["fhir_ai"].registry is served
        assert any("not followed" in r.getMessage() for r in caplog.records)
    finally:
        runtime.close()
        first.extensions["fhir_ai"].close()
        second.extensions["fhir_ai"].close()


def test_a_worker_checks_for_reloads_at_most_every_interval(mappings_dir, settings_overrides):
    from fhir_ai.app import create_app
    settings_overrides["reload_check_interval"] = 3600
    first, second = create_app(settings_overrides), create_app(settings_overrides)
    try:
        add_local_heart_rate_code(mappings_dir / "deterioration.yaml")
        assert first.test_client().post("/mappings/$reload").status_code == 200
        assert second.test_client().get("/mappings").json["reload"] == 0      # not yet: next check in an hour
        from fhir_ai import reloads
        reloads.follower(second.extensions["fhir_ai"]).state.next_check = 0   # the hour has passed
        assert second.test_client().get("/mappings").json["reload"] == 1
    finally:
        first.extensions["fhir_ai"].close()
        second.extensions["fhir_ai"].close()
