"""The FHIR API on the demo hospital: $assess, RiskAssessment read/search, metadata, errors."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.riskassessment import RiskAssessment

from fhir_ai import codes
from fhir_ai.api.fhir_io import bundle
from fhir_ai.app import create_app
from fhir_ai.pipeline import Pipeline
from fhir_ai.store import Store

try:
    from . import databases
    from .credentials import TEST_TOKENS_SETTING
    from .stored import risk_assessment
except ImportError:
    import databases  # type: ignore[no-redef]
    from credentials import TEST_TOKENS_SETTING  # type: ignore[no-redef]
    from stored import risk_assessment  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
AS_OF = "2026-11-20T08:00:00Z"
FHIR = "application/fhir+json"


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    with databases.fresh_database(tmp) as database_url:
        app = create_app({"instance_path": str(tmp), "database_url": database_url,
                          "auth_tokens": TEST_TOKENS_SETTING,
                          "source_url": str(REPO / "fixtures" / "demo-hospital"), "write_back": False,
                          # a queue of its own on the shared Redis: a worker someone runs on the default
                          # queue must not change what /health says here
                          "job_queue": f"fhir-ai-test-api-{uuid.uuid4().hex[:12]}"})
        app.testing = True
        yield app
        app.extensions["fhir_ai"].close()


@pytest.fixture()
def api(demo_app):
    return demo_app.test_client()


def params(**values) -> dict:
    out = []
    for name, value in values.items():
        key = {"model": "valueCode", "writeBack": "valueBoolean", "asOf": "valueDateTime"}[name]
        out.append({"name": name, key: value})
    return {"resourceType": "Parameters", "parameter": out}


def assess(api, patient: str, **values):
    return api.post(f"/Patient/{patient}/$assess", json=params(**values), content_type=FHIR)


def test_metadata_is_a_truthful_capability_statement(api):
    response = api.get("/metadata")
    assert response.status_code == 200
    assert response.mimetype == FHIR
    statement = CapabilityStatement.model_validate(response.json)
    assert statement.fhirVersion == "4.0.1"
    resources = {r["type"]: r for r in response.json["rest"][0]["resource"]}
    assert resources["Patient"]["operation"][0]["name"] == "assess"
    assert {p["name"] for p in resources["RiskAssessment"]["searchParam"]} >= {"patient", "subject", "_count"}
    definition = api.get("/OperationDefinition/assess").json
    assert {p["name"] for p in definition["parameter"]} == {"model", "writeBack", "asOf", "encounter", "return"}
    # A parameter that does not do what R4's of that name does is declared as ours: Provenance?patient= finds
    # the Provenance of a patient's assessments, where R4's Provenance-patient wants a target that is a Patient.
    provenance = {p["name"]: p for p in resources["Provenance"]["searchParam"]}
    assert provenance["patient"]["definition"] == "https://fhir-ai.invalid/SearchParameter/Provenance-patient"
    assert "subject" in provenance["patient"]["documentation"]
    assert provenance["target"]["definition"] == "http://hl7.org/fhir/SearchParameter/Provenance-target"


def test_assess_returns_a_valid_explained_risk_assessment(api):
    response = assess(api, "demo-005", asOf=AS_OF)
    assert response.status_code == 200, response.json
    bundle = Bundle.model_validate(response.json)
    assert bundle.type == "collection"
    ra = response.json["entry"][0]["resource"]
    RiskAssessment.model_validate(ra)
    assert ra["status"] == "final"
    assert ra["subject"] == {"reference": "Patient/demo-005"}
    assert ra["encounter"]["reference"].startswith("Encounter/demo-enc-")
    assert ra["occurrenceDateTime"] == AS_OF
    method = ra["method"]["coding"]
    assert method[0]["system"] == codes.MODEL_SYSTEM and method[0]["code"] == "deterioration"
    assert method[0]["version"] and method[1]["code"] == f"deterioration|{method[0]['version']}"
    assert len(ra["basis"]) > 50 and all(b["reference"].startswith("Observation/") for b in ra["basis"])
    prediction = ra["prediction"][0]
    assert 0 <= prediction["probabilityDecimal"] <= 1
    assert prediction["qualitativeRisk"]["coding"][0]["code"] in {"low", "moderate", "high"}
    assert prediction["rationale"].startswith("Top contributing inputs:")
    assert prediction["rationale"].count("the risk") == 5
    assert ra["identifier"][0]["system"] == codes.ASSESSMENT_IDENTIFIER
    assert ra["meta"]["security"][0]["code"] == "AIAST"
    assert any("0 and 1" in n["text"] for n in ra["note"])
    news2 = response.json["entry"][1]["resource"]
    assert news2["method"]["coding"][0]["code"] == "news2"
    assert news2["prediction"][0]["rationale"].startswith("NEWS2 ")
    assert news2["method"]["coding"][0]["version"] == "rcp-2017"
    assert 1 <= len(news2["basis"]) <= 7          # the latest value of each NEWS2 parameter only
    assert {b["reference"] for b in news2["basis"]} <= {b["reference"] for b in ra["basis"]}


def test_basis_excludes_entered_in_error_and_later_data(api):
    ra = assess(api, "demo-001", asOf=AS_OF).json["entry"][0]["resource"]
    # demo-001 has an old finished encounter with abnormal results more than 48 h ago: not used.
    encounter = ra["encounter"]["reference"]
    assert encounter != "Encounter/demo-enc-013"
    early = assess(api, "demo-001", asOf="2026-11-19T08:00:00Z").json["entry"][0]["resource"]
    assert len(early["basis"]) < len(ra["basis"])
    assert early["id"] != ra["id"]


def test_repeating_a_request_creates_no_duplicate(api):
    first = assess(api, "demo-002", asOf=AS_OF).json["entry"][0]["resource"]
    second = assess(api, "demo-002", asOf=AS_OF).json["entry"][0]["resource"]
    assert first["id"] == second["id"]
    assert second["meta"]["versionId"] == "1"
    found = api.get("/RiskAssessment?patient=demo-002").json
    methods = [e["resource"]["method"]["coding"][0]["code"] for e in found["entry"]]
    assert sorted(methods) == ["deterioration", "news2"]


def test_insufficient_data_is_said_explicitly(api):
    response = assess(api, "demo-010", asOf=AS_OF)
    assert response.status_code == 200
    ra = response.json["entry"][0]["resource"]
    assert ra["status"] == "cancelled"
    assert "prediction" not in ra
    assert ra["note"][0]["text"].startswith("Not assessed: insufficient data.")
    outcome = response.json["entry"][-1]["resource"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "incomplete"
    news2 = response.json["entry"][1]["resource"]
    assert news2["status"] == "cancelled"


def test_assess_without_body_uses_defaults(api):
    response = api.post("/Patient/demo-003/$assess")
    assert response.status_code == 200
    # "now" is after the demo data's last day plus the 48 h window: nothing recent enough to score.
    assert response.json["entry"][0]["resource"]["status"] == "cancelled"


def test_read_and_search(api):
    ra = assess(api, "demo-004", asOf=AS_OF).json["entry"][0]["resource"]
    read = api.get(f"/RiskAssessment/{ra['id']}")
    assert read.status_code == 200
    assert read.json["identifier"] == ra["identifier"]
    assert read.headers["ETag"] == 'W/"1"'
    page = api.get("/RiskAssessment?subject=Patient/demo-004&_count=1").json
    assert page["type"] == "searchset" and page["total"] == 2 and len(page["entry"]) == 1
    next_url = next(link["url"] for link in page["link"] if link["relation"] == "next")
    rest = api.get(next_url.replace("http://localhost", "")).json
    assert len(rest["entry"]) == 1
    assert rest["entry"][0]["resource"]["id"] != page["entry"][0]["resource"]["id"]
    assert not [link for link in rest["link"] if link["relation"] == "next"]


@pytest.mark.parametrize("path, status, expression", [
    ("/RiskAssessment/unknown-id", 404, None),
    ("/RiskAssessment?color=blue", 400, "color"),
    ("/RiskAssessment?_count=many", 400, "_count"),
    ("/RiskAssessment?subject=Observation/1", 400, "subject"),   # R4: subject is Patient or Group
    ("/Nothing/here", 404, None),
])
def test_read_and_search_errors_are_operation_outcomes(api, path, status, expression):
    response = api.get(path)
    assert response.status_code == status
    assert response.json["resourceType"] == "OperationOutcome"
    if expression:
        assert response.json["issue"][0]["expression"] == [expression]


def test_lenient_search_ignores_unknown_parameters(api):
    response = api.get("/RiskAssessment?color=blue", headers={"Prefer": "handling=lenient"})
    assert response.status_code == 200
    assert response.json["entry"][-1]["search"]["mode"] == "outcome"


@pytest.mark.parametrize("prefer, status", [
    ("return=minimal, handling = lenient", 200),           # one preference of a list, spaces around '='
    ("Handling=Lenient", 200),
    ('x-note="handling=lenient"', 400),                     # inside a quoted value: no preference of its own
    ("handling=strict", 400),
    ("handling=lenient-ish", 400),
])
def test_lenient_handling_is_a_preference_of_its_own(api, prefer, status):
    assert api.get("/RiskAssessment?color=blue", headers={"Prefer": prefer}).status_code == status


@pytest.mark.parametrize("body, content_type, status, expression", [
    ({"resourceType": "Parameters", "parameter": [{"name": "colour", "valueString": "red"}]}, FHIR, 400,
     "Parameters.parameter[0].name"),
    ({"resourceType": "Parameters", "parameter": [{"name": "writeBack", "valueString": "yes"}]}, FHIR, 400,
     "Parameters.parameter[0]"),
    ({"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T08:00:00"}]},
     FHIR, 400, "Parameters.parameter[0].valueDateTime"),
    ({"resourceType": "Parameters", "parameter": [{"name": "model", "valueCode": "crystal-ball"}]}, FHIR, 400,
     "Parameters.parameter.where(name='model')"),
    ({"resourceType": "Patient"}, FHIR, 400, "resourceType"),
    ("not json", FHIR, 400, "Parameters"),
    ({"resourceType": "Parameters"}, "text/plain", 415, "http.Content-Type"),
])
def test_bad_parameters_are_rejected_with_the_offending_path(api, body, content_type, status, expression):
    """The offending element in issue.expression; an HTTP header at fault in issue.location (R4: 'http.' +
    the header's name)."""
    data = body if isinstance(body, str) else __import__("json").dumps(body)
    response = api.post("/Patient/demo-001/$assess", data=data, content_type=content_type)
    assert response.status_code == status
    outcome = response.json
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Traceback" not in response.get_data(as_text=True)
    where = "location" if expression.startswith("http.") else "expression"
    assert outcome["issue"][0][where] == [expression]
    OperationOutcome.model_validate(outcome)


def test_unknown_patient_is_404(api):
    response = assess(api, "nobody", asOf=AS_OF)
    assert response.status_code == 404
    assert response.json["issue"][0]["code"] == "not-found"


@pytest.mark.parametrize("as_of, status, said", [
    (AS_OF, 422, "ended at 2026-08-14T06:00:00Z, before asOf"),        # a visit that ended in August
    ("2026-08-01T00:00:00Z", 422, "starts at 2026-08-08T03:00:00Z, after asOf"),
    ("2026-08-10T00:00:00Z", 200, None),                               # during the visit
])
def test_a_pinned_encounter_must_be_going_on_at_as_of(api, as_of, status, said):
    """An assessment as of a time outside the pinned visit would read data from outside it and be labelled
    with it: refused, naming the encounter parameter (demo-001's earlier visit demo-enc-013)."""
    body = params(asOf=as_of)
    body["parameter"].append({"name": "encounter", "valueReference": {"reference": "Encounter/demo-enc-013"}})
    response = api.post("/Patient/demo-001/$assess", json=body, content_type=FHIR)
    assert response.status_code == status, response.json
    if said:
        issue = response.json["issue"][0]
        assert said in issue["diagnostics"] and "Encounter/demo-enc-013" in issue["diagnostics"]
        assert issue["expression"] == ["Parameters.parameter.where(name='encounter')"]
    else:
        assert response.json["entry"][0]["resource"]["encounter"] == {"reference": "Encounter/demo-enc-013"}


def test_method_not_allowed_is_an_operation_outcome(api):
    response = api.delete("/RiskAssessment/x")
    assert response.status_code == 405
    assert response.json["resourceType"] == "OperationOutcome"


def test_xml_is_not_acceptable(api):
    response = api.get("/RiskAssessment?_format=xml")
    assert response.status_code == 406
    assert response.json["issue"][0]["expression"] == ["_format"]
    response = api.get("/RiskAssessment", headers={"Accept": "application/fhir+xml"})
    assert response.status_code == 406
    assert response.json["issue"][0]["location"] == ["http.Accept"]


def test_health(api):
    body = api.get("/health").json
    assert "deterioration" in body["models"]
    assert body["writeBack"]["status"] == "ok" and body["queue"]["status"] == "ok"
    # No `fhir-ai worker` (nor its beat scheduler) runs for this test, and that makes it degraded
    # (tests/integration/test_worker_heartbeat.py runs real ones; test_jobs_disabled a site without batch jobs).
    assert body["workers"]["status"] == "none seen" and body["status"] == "degraded"
    assert body["scheduler"]["status"] == "none seen" and "the resumption of lost jobs" in body["scheduler"]["message"]


# $assess answers embed each new RiskAssessment's stored JSON (orjson.Fragment) instead of serialising it
# again: the answer is byte for byte what serialising the resources gives (new and repeated assessments,
# with and without an OperationOutcome).
@pytest.fixture()
def results(monkeypatch):
    """Every AssessResult the pipeline hands to the API."""
    seen = []
    original = Pipeline.assess

    def spy(self, *args, **kwargs):
        seen.append(original(self, *args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(Pipeline, "assess", spy)
    return seen


@pytest.mark.parametrize("patient", ["demo-005", "demo-010"])     # demo-010: insufficient data, a warning
def test_the_answer_is_the_resources_serialised(api, results, patient):
    body = {"resourceType": "Parameters", "parameter": [{"name": "asOf", "valueDateTime": "2026-11-20T07:00:00Z"}]}
    answers = []
    for _ in range(2):                                                  # new, then a repeat
        response = api.post(f"/Patient/{patient}/$assess", json=body, content_type=FHIR)
        assert response.status_code == 200, response.json
        result = results[-1]
        outcome = {"resourceType": "OperationOutcome", "issue": result.issues} if result.issues else None
        # what the answer was before: the resources serialised by orjson
        assert response.data == orjson.dumps(bundle("collection", result.resources, "http://localhost",
                                                    outcome=outcome))
        answers.append(response.data)
    for result in results:                                              # a new one's answer embeds its text
        assert [text is not None for text in result.texts] == result.created
    assert patient == "demo-010" or results[0].created == [True, True]  # demo-010's may be stored already
    assert results[1].created == [False, False]
    assert answers[0] == answers[1]
    assert patient != "demo-010" or b'"OperationOutcome"' in answers[0]


def test_saved_text_is_the_stored_json_of_the_resource(database_url):
    store = Store(database_url)
    try:
        odd = risk_assessment("u1", probability=0.1 + 0.2, note=[{"text": "Überwachung – 観察 \u2028 \"q\" \\ \U0001f600"}])
        saved = store.save_assessment(odd, model_id="deterioration", model_version="1.0")
        assert saved.text == orjson.dumps(saved.resource).decode()
        assert saved.text == orjson.dumps(store.get_assessment("u1")).decode()
        repeat = store.save_assessment(odd, model_id="deterioration", model_version="1.0")
        assert not repeat.created and repeat.text is None and repeat.resource == saved.resource
        with_text = bundle("collection", [saved.resource, repeat.resource], "https://x", texts=[saved.text, None])
        without = bundle("collection", [saved.resource, repeat.resource], "https://x")
        assert orjson.dumps(with_text) == orjson.dumps(without)
    finally:
        store.close()


def test_a_reload_meanwhile_cannot_pair_a_model_with_another_mappings_features(demo_app, monkeypatch):
    """$assess takes each model with its mapping once: a $reload in another thread between reading the
    features and scoring cannot pair the new model with the old mapping's features (or the reverse). Here
    the registry hands out another pair from the second lookup on: the answer is the first pair's."""
    pipeline = demo_app.extensions["fhir_ai"]
    real_get = pipeline.registry.get
    lookups: list[str] = []

    def get(model_id: str):
        lookups.append(model_id)
        if lookups.count(model_id) > 1:
            raise AssertionError(f"{model_id} looked up twice in one assessment")
        return real_get(model_id)

    monkeypatch.setattr(pipeline.registry, "get", get)
    result = pipeline.assess("demo-002", models=["deterioration", "triage"] if "triage" in pipeline.registry.models
                             else ["deterioration"], as_of=datetime(2026, 11, 20, 8, tzinfo=timezone.utc))
    assert result.resources and sorted(set(lookups)) == sorted(lookups)
