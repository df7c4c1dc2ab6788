"""Integrators list, check and reload mappings over HTTP; a bad mapping is reported and never loaded."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FHIR = "application/fhir+json"


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
    assert bad["issue"][0]["expression"] == [f"{path}: inputs.heart_rate.value.unit"]

    refused = client.post("/mappings/$reload")
    assert refused.status_code == 422
    assert refused.json["resourceType"] == "OperationOutcome"
    # The server keeps serving what it had loaded.
    assessed = client.post("/Patient/demo-005/$assess", content_type=FHIR, json={
        "resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T08:00:00Z"}]})
    assert assessed.status_code == 200

    local = good.replace("    - system: http://loinc.org\n      code: 8867-4\n",
                         "    - system: http://loinc.org\n      code: 8867-4\n"
                         "    - system: urn:oid:1.2.410.100\n      code: HR-LOCAL\n", 1)
    assert local != good
    path.write_text(local)
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
