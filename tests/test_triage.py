"""KTAS triage: mapping (English and Korean complaints), units, missing vitals, training, second reader, API."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from fhir.resources.R4B.riskassessment import RiskAssessment

from fhir_ai.app import create_app
from fhir_ai.assessment import UNWEIGHTED
from fhir_ai.cli import main
from fhir_ai.datasets import ktas
from fhir_ai.features import Extractor
from fhir_ai.mapping import load_mapping

try:
    from . import databases
except ImportError:
    import databases  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ktas"
FHIR = "application/fhir+json"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason="shared data not mounted")


@pytest.fixture(scope="module")
def mapping():
    return load_mapping(REPO / "mappings" / "triage.yaml")


@pytest.fixture(scope="module")
def visits():
    return list(ktas.iter_visits(DATA, limit=40))


def features_of(mapping, resources):
    extractor = Extractor(mapping)
    extractor.add_all(resources)
    return extractor.finish(as_of=None)


def value(fs, name, row=0):
    return fs.X[row, fs.feature_names.index(name)]


def with_complaint(resources, text):
    out = copy.deepcopy(resources)
    encounter = next(r for r in out if r["resourceType"] == "Encounter")
    if text is None:
        encounter.pop("reasonCode", None)
    else:
        encounter["reasonCode"] = [{"text": text}]
    return out


def test_every_documented_input_is_mapped(mapping, visits):
    visit = visits[0]          # row 1: right ocular pain, injury, private vehicle, alert, pain 2, vitals, nurse 2
    fs = features_of(mapping, visit.resources)
    assert value(fs, "age") == 71 and value(fs, "sex_male") == 1
    assert value(fs, "arrival_ambulance") == 0 and value(fs, "arrival_walking") == 0
    assert value(fs, "injury") == 1
    assert value(fs, "complaint_eye_ent_dental") == 1 and value(fs, "complaint_chest_pain") == 0
    assert value(fs, "mental_first") == 1 and value(fs, "pain_first") == 1 and value(fs, "pain_score_first") == 2
    assert [value(fs, f) for f in ("systolic_bp_first", "diastolic_bp_first", "heart_rate_first",
                                   "resp_rate_first", "temperature_first", "spo2_first")] == [160, 100, 84, 18, 36.6, 100]
    assert fs.reference.tolist() == [2]                       # the nurse's level, read for the second reader
    assert "nurse_ktas" not in {f.input for f in mapping.features}


@pytest.mark.parametrize("text, expected", [
    ("가슴 통증과 호흡곤란", {"chest_pain", "dyspnea"}),
    ("복통이 심함", {"abdominal_pain"}),
    ("두통으로 내원", {"headache"}),
    ("교통사고 후 골절 의심", {"trauma"}),
    ("ant. chest pain", {"chest_pain"}),
    ("HA", {"headache"}),
    ("hand injury", {"trauma", "pain_musculoskeletal"}),
    ("Lt. side motor weakness, dysarthria", {"neuro_deficit", "general_weakness"}),
    ("quantum flux headgear", set()),
])
def test_chief_complaint_categories_in_english_and_korean(mapping, visits, text, expected):
    fs = features_of(mapping, with_complaint(visits[1].resources, text))
    columns = [f for f in fs.feature_names if f.startswith("complaint_")]
    hits = {name[len("complaint_"):] for name in columns if value(fs, name) == 1}
    assert hits == expected
    assert all(value(fs, name) in (0, 1) for name in columns)


def test_no_complaint_text_is_missing_not_zero(mapping, visits):
    fs = features_of(mapping, with_complaint(visits[1].resources, None))
    assert math.isnan(value(fs, "complaint_chest_pain"))


def test_unit_alternatives(mapping, visits):
    resources = copy.deepcopy(visits[0].resources)
    for r in resources:
        code = r.get("code", {}).get("coding", [{}])[0].get("code")
        if code == "8310-5":
            r["valueQuantity"] = {"value": 97.88, "unit": "°F"}
        if code == "59408-5":
            r["valueQuantity"] = {"value": 0.97, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}
    fs = features_of(mapping, resources)
    assert value(fs, "temperature_first") == pytest.approx(36.6, abs=0.01)
    assert value(fs, "spo2_first") == pytest.approx(97.0)


def test_missing_spo2_at_the_local_ed_still_scores(mapping, visits):
    local = next(v for v in visits if not any(r.get("id", "").endswith("-saturation") for r in v.resources))
    fs = features_of(mapping, local.resources)
    assert math.isnan(value(fs, "spo2_first"))
    assert fs.sufficient().tolist() == [True]


def test_tiny_model_trains_reproducibly_without_the_nurse_level(tmp_path):
    out = tmp_path / "triage"
    args = ["train", "triage", "--data", str(DATA), "--out", str(out), "--limit", "300", "--rounds", "20"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["visits"] == 300 and card["training"]["nurse_level_used_as_input"] is False
    assert card["classes"] == ["1", "2", "3", "4", "5"]
    assert card["decision"]["beta"] >= 1.0
    assert set(card["metrics"]) == {"model", "model_argmax", "nurse", "n"}
    assert card["metrics"]["nurse"]["exact_accuracy"] == pytest.approx(
        np.mean([v.label["ktas_rn"] == v.label["ktas_expert"] for v in ktas.iter_visits(DATA, limit=300)]))
    again = tmp_path / "again"
    assert CliRunner().invoke(main, args[:5] + [str(again)] + args[6:]).exit_code == 0
    assert (again / "model.txt").read_bytes() == (out / "model.txt").read_bytes()


@pytest.fixture(scope="module")
def triage_api(tmp_path_factory, visits):
    tmp = tmp_path_factory.mktemp("triage")
    folder = tmp / "ed"
    ktas.write_ndjson((r for v in visits for r in v.resources), folder)
    with databases.fresh_database(tmp) as database_url:
        app = create_app({"instance_path": str(tmp), "database_url": database_url,
                          "source_url": str(folder), "write_back": False})
        app.testing = True
        yield app.test_client()
        app.extensions["fhir_ai"].close()


def assess(client, patient, **extra):
    parameters = [{"name": "model", "valueCode": "triage"},
                  {"name": "asOf", "valueDateTime": "2100-01-01T00:30:00Z"}]
    parameters += [{"name": k, **v} for k, v in extra.items()]
    return client.post(f"/Patient/{patient}/$assess", content_type=FHIR,
                       json={"resourceType": "Parameters", "parameter": parameters})


def test_triage_risk_assessment_with_second_reader(triage_api, visits):
    response = assess(triage_api, "ktas-1", encounter={"valueReference": {"reference": "Encounter/ktas-enc-1"}})
    assert response.status_code == 200, response.json
    ra = response.json["entry"][0]["resource"]
    RiskAssessment.model_validate(ra)
    assert ra["method"]["coding"][0]["code"] == "triage"
    assert ra["encounter"] == {"reference": "Encounter/ktas-enc-1"}
    levels = [p for p in ra["prediction"] if p["outcome"]["coding"][0]["system"].endswith("ktas-level")]
    assert [p["outcome"]["coding"][0]["code"] for p in levels] == ["1", "2", "3", "4", "5"]
    assert sum(p["probabilityDecimal"] for p in levels) == pytest.approx(1.0, abs=1e-3)
    top = max(levels, key=lambda p: p["probabilityDecimal"])
    marked = [p for p in levels if p["qualitativeRisk"]["coding"][0]["code"] == "high"]
    assert marked == [top] and top["rationale"].startswith("Predicted KTAS level")
    assert "소생" in json.dumps(levels[0], ensure_ascii=False)
    under = next(p for p in ra["prediction"] if p["outcome"]["coding"][0]["code"] == "under-triage")
    unweighted = [next(e["valueDecimal"] for e in p["extension"] if e["url"] == UNWEIGHTED) for p in levels]
    assert under["probabilityDecimal"] == pytest.approx(sum(unweighted[:1]), abs=2e-4)   # nurse said KTAS 2
    assert "Nurse assigned KTAS 2" in under["rationale"]
    assert any("nurse's KTAS level (2) stands" in n["text"] for n in ra["note"])
    basis = {b["reference"] for b in ra["basis"]}
    assert "Observation/ktas-1-ktas-rn" in basis


def test_without_a_nurse_level_there_is_no_mistriage_prediction(visits, tmp_path, database_url):
    resources = [r for r in visits[2].resources if not r.get("id", "").endswith("-ktas-rn")]
    ktas.write_ndjson(resources, tmp_path / "ed")
    app = create_app({"instance_path": str(tmp_path), "database_url": database_url, "write_back": False,
                      "source_url": str(tmp_path / "ed")})
    try:
        ra = assess(app.test_client(), visits[2].resources[0]["id"]).json["entry"][0]["resource"]
    finally:
        app.extensions["fhir_ai"].close()
    assert len(ra["prediction"]) == 5
    assert any("No nurse KTAS level" in n["text"] for n in ra["note"])


def test_triage_is_not_applied_outside_the_emergency_department(visits, tmp_path, database_url):
    resources = copy.deepcopy(visits[0].resources)
    encounter = next(r for r in resources if r["resourceType"] == "Encounter")
    encounter["class"] = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}
    ktas.write_ndjson(resources, tmp_path / "ward")
    app = create_app({"instance_path": str(tmp_path), "database_url": database_url, "write_back": False,
                      "source_url": str(tmp_path / "ward")})
    try:
        answer = assess(app.test_client(), resources[0]["id"])
    finally:
        app.extensions["fhir_ai"].close()
    assert answer.status_code == 200
    ra = answer.json["entry"][0]["resource"]
    assert ra["status"] == "cancelled" and "prediction" not in ra        # no KTAS level for a ward patient
    assert (f"Not assessed: not applicable. The triage model is for encounters of class EMER; the current "
            f"encounter (Encounter/{encounter['id']}) is of class IMP.") in [n["text"] for n in ra["note"]]
    warnings = answer.json["entry"][-1]["resource"]["issue"]
    assert any(w["diagnostics"].startswith("triage: not assessed, not applicable.") for w in warnings)
    # The same visit in the emergency department is assessed.
    encounter["class"]["code"] = "EMER"
    fs = features_of(load_mapping(REPO / "mappings" / "triage.yaml"), resources)
    assert fs.applicable().tolist() == [True] and fs.encounter_classes == ["EMER"]


def test_bad_triage_requests_are_operation_outcomes(triage_api):
    bad = assess(triage_api, "ktas-1", encounter={"valueReference": {"reference": "Observation/x"}})
    assert bad.status_code == 400
    assert bad.json["issue"][0]["expression"] == ["Parameters.parameter[2].valueReference"]
    other = assess(triage_api, "ktas-1", encounter={"valueString": "Encounter/ktas-enc-2"})
    assert other.status_code == 404 and other.json["resourceType"] == "OperationOutcome"


def test_bulk_assess_triage(tmp_path, visits):
    folder = tmp_path / "ed"
    ktas.write_ndjson((r for v in visits for r in v.resources), folder)
    out = tmp_path / "ra.ndjson"
    result = CliRunner().invoke(main, ["bulk-assess", "--input", str(folder), "--output", str(out),
                                       "--model", "triage", "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(lines) == len(visits)
    assert all(ra["status"] == "final" and len(ra["prediction"]) == 7 for ra in lines)


def test_tiny_probabilities_are_never_stated_as_zero() -> None:
    # A class probability of 0.00004 rounded to 4 decimals is 0.0, and ':.2f' of 0.0012 is '0.00': both
    # would state a certainty the model does not have (129 of 950 KTAS visits read "more urgent: 0.00").
    from fhir_ai.assessment import probability_decimal, probability_text
    assert probability_decimal(0.00004) == 0.0001 and probability_decimal(0.99996) == 0.9999
    assert probability_decimal(0.12344) == 0.1234 and probability_decimal(0.0) == 0.0
    assert probability_decimal(1.0) == 1.0
    assert probability_text(0.0012) == "<0.01" and probability_text(0.996) == ">0.99"
    assert probability_text(0.005) == "0.01" and probability_text(0.0) == "0.00"


def test_bulk_assess_triage_without_explanations_states_no_zero_and_no_empty_reasons(tmp_path, visits):
    folder = tmp_path / "ed"
    ktas.write_ndjson((r for v in visits for r in v.resources), folder)
    out = tmp_path / "ra.ndjson"
    result = CliRunner().invoke(main, ["bulk-assess", "--input", str(folder), "--output", str(out),
                                       "--model", "triage", "--explain", "none", "--no-progress"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "inputs: ." not in text
    for ra in map(orjson.loads, text.splitlines()):
        for prediction in ra["prediction"]:
            code = prediction["outcome"]["coding"][0]["code"]
            nurse = prediction.get("rationale", "").partition("Nurse assigned KTAS ")[2][:1]
            if (code, nurse) in {("over-triage", "5"), ("under-triage", "1")}:
                # nothing is less urgent than 5 (more urgent than 1): 0 by construction, and said so
                assert prediction["probabilityDecimal"] == 0 and prediction["rationale"].endswith(": 0.00.")
                continue
            assert 0 < prediction["probabilityDecimal"] < 1
            assert ": 0.00" not in prediction.get("rationale", "")
            assert all(0 < e["valueDecimal"] < 1 for e in prediction.get("extension", []))
        predicted = next(p for p in ra["prediction"] if "rationale" in p and p["rationale"].startswith("Predicted"))
        assert predicted["rationale"].endswith(").")
