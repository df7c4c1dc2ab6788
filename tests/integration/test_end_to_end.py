"""$assess end to end against the real sekmet FHIR server: read the chart, score, store, write back once."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from fhir_ai import codes
from fhir_ai.api.risk_assessments import WRITE_BACK_EXTENSION
from fhir_ai.app import create_app
from fhir_ai.fhir.client import outcome_text
from fhir_ai.pipeline import Pipeline

try:
    from .sekmet import SekmetServer
    from ..factories import encounter, fhir_time, new_id, patient, sepsis_observations
except ImportError:
    from sekmet import SekmetServer  # type: ignore[no-redef]
    from factories import encounter, fhir_time, new_id, patient, sepsis_observations  # type: ignore[no-redef]

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
RISK_CODES = set(codes.RISK_DISPLAY)


def load_chart(server: SekmetServer, now: datetime) -> tuple[str, str, list[dict[str, Any]]]:
    """A patient in an in-progress ICU stay with 20 vital signs and labs over the last 12 hours."""
    pid, eid = new_id("pat"), new_id("enc")
    observations = sepsis_observations(pid, eid, last=now - timedelta(minutes=10))
    server.load([patient(id=pid), encounter(pid, id=eid, period={"start": fhir_time(now - timedelta(days=1))}),
                 *observations])
    return pid, eid, observations


def make_app(settings_overrides: dict[str, Any], server: SekmetServer, **extra: Any) -> Flask:
    return create_app({**settings_overrides, "source_url": server.base_url, "write_back": True, **extra})


def assess(client: FlaskClient, patient_id: str, as_of: datetime | None = None) -> TestResponse:
    parameters = [{"name": "asOf", "valueDateTime": fhir_time(as_of)}] if as_of else []
    body = json.dumps({"resourceType": "Parameters", "parameter": parameters})
    response = client.post(f"/Patient/{patient_id}/$assess", data=body, content_type=FHIR_JSON)
    assert "Traceback" not in response.get_data(as_text=True)
    return response


def entries(response: TestResponse, resource_type: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in response.get_json()["entry"] if e["resource"]["resourceType"] == resource_type]


def issues(response: TestResponse) -> list[dict[str, Any]]:
    return [issue for outcome in entries(response, "OperationOutcome") for issue in outcome["issue"]]


def per_method(resources: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    """How many RiskAssessments each method (model or rule score, with version) has."""
    return Counter((r["method"]["coding"][0]["code"], r["method"]["coding"][0]["version"]) for r in resources)


def on_sekmet(server: SekmetServer, patient_id: str) -> list[dict[str, Any]]:
    return server.search("RiskAssessment", {"subject": f"Patient/{patient_id}"})


def stored_here(client: FlaskClient, patient_id: str) -> list[dict[str, Any]]:
    response = client.get("/RiskAssessment", query_string={"patient": patient_id})
    assert response.status_code == 200
    bundle = response.get_json()
    found = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert bundle["total"] == len(found)
    return found


@pytest.fixture
def app(settings_overrides: dict[str, Any], sekmet: SekmetServer) -> Iterator[Flask]:
    app = make_app(settings_overrides, sekmet)
    yield app
    app.extensions["fhir_ai"].close()


def test_assess_reads_sekmet_and_writes_back_exactly_once(app: Flask, client: FlaskClient,
                                                          sekmet: SekmetServer) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    pid, eid, observations = load_chart(sekmet, now)
    as_of = now - timedelta(minutes=5)

    response = assess(client, pid, as_of)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert issues(response) == []                    # complete data, write-back delivered
    model, news2 = entries(response, "RiskAssessment")

    assert model["status"] == "final"
    assert model["subject"] == {"reference": f"Patient/{pid}"}
    assert model["encounter"] == {"reference": f"Encounter/{eid}"}
    assert model["occurrenceDateTime"] == fhir_time(as_of)
    prediction = model["prediction"][0]
    assert 0.0 <= prediction["probabilityDecimal"] <= 1.0
    [risk] = prediction["qualitativeRisk"]["coding"]
    assert risk["system"] == codes.RISK_PROBABILITY and risk["code"] in RISK_CODES
    loaded, _ = app.extensions["fhir_ai"].registry.get("deterioration")
    method = model["method"]["coding"][0]
    assert (method["system"], method["code"], method["version"]) == (codes.MODEL_SYSTEM, "deterioration",
                                                                     loaded.version)
    basis = {b["reference"] for b in model["basis"]}
    assert basis == {f"Observation/{o['id']}" for o in observations}   # every one of the 20 was used
    for reference in basis | {b["reference"] for b in news2["basis"]}:
        assert sekmet.read(*reference.split("/"))["subject"]["reference"] == f"Patient/{pid}"
    assert news2["method"]["coding"][0]["code"] != "deterioration"

    written = on_sekmet(sekmet, pid)
    assert sorted(r["id"] for r in written) == sorted([model["id"], news2["id"]])
    assert per_method(written) == per_method([model, news2]) and set(per_method(written).values()) == {1}
    sekmet_model = next(r for r in written if r["id"] == model["id"])
    assert sekmet_model["prediction"][0]["probabilityDecimal"] == prediction["probabilityDecimal"]
    assert sekmet_model["identifier"] == model["identifier"]

    # The same request again, and once more without asOf (the same data is in every window): no duplicate.
    again = assess(client, pid, as_of)
    now_response = assess(client, pid)
    for repeat in (again, now_response):
        assert repeat.status_code == 200
        assert [r["id"] for r in entries(repeat, "RiskAssessment")] == [model["id"], news2["id"]]
        assert issues(repeat) == []
    written = on_sekmet(sekmet, pid)
    assert len(written) == 2 and set(per_method(written).values()) == {1}
    assert {r["meta"]["versionId"] for r in written} == {"1"}        # never even re-sent
    ours = stored_here(client, pid)
    assert sorted(r["id"] for r in ours) == sorted([model["id"], news2["id"]])
    assert set(per_method(ours).values()) == {1}


def test_unknown_patient_is_404_with_sekmets_words(client: FlaskClient, sekmet: SekmetServer) -> None:
    pid = new_id("nobody")
    direct = requests.get(sekmet.url(f"Patient/{pid}"), headers={"Accept": FHIR_JSON}, timeout=30)
    assert direct.status_code == 404
    sekmet_text = outcome_text(direct.json())
    assert sekmet_text

    response = assess(client, pid)
    assert response.status_code == 404
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["code"] == "not-found"
    assert issue["details"]["text"] == sekmet_text
    assert sekmet_text in issue["diagnostics"]


def test_write_back_during_an_outage_is_queued_and_delivered_once(
        settings_overrides: dict[str, Any], sekmet_factory: Callable[..., SekmetServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = sekmet_factory()                        # private: the session server stays up for others
    now = datetime.now(timezone.utc).replace(microsecond=0)
    pid, _, _ = load_chart(server, now)
    app = make_app(settings_overrides, server, source_retries=0)   # no back-off sleeps against a dead port
    pipeline: Pipeline = app.extensions["fhir_ai"]
    client = app.test_client()
    try:
        # The hospital's server goes down after we have read the chart, before we write back.
        read_record = pipeline.source.record

        def then_outage(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            found = read_record(*args, **kwargs)
            server.stop()
            return found

        monkeypatch.setattr(pipeline.source, "record", then_outage)
        response = assess(client, pid, now - timedelta(minutes=5))
        monkeypatch.undo()

        assert response.status_code == 200, response.get_data(as_text=True)
        stored = entries(response, "RiskAssessment")
        assert len(stored) == 2
        warnings = issues(response)
        assert len(warnings) == 2
        assert all(w["severity"] == "warning" and "queued for retry" in w["diagnostics"] for w in warnings)
        for resource in stored:
            read = client.get(f"/RiskAssessment/{resource['id']}")
            assert read.status_code == 200
            [ext] = [e for e in read.get_json()["extension"] if e["url"] == WRITE_BACK_EXTENSION]
            state = {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in ext["extension"]}
            assert state["status"] == "pending" and state["attempts"] == 1

        server.start()                               # same port, same data
        assert on_sekmet(server, pid) == []
        assert pipeline.retry_write_backs() == {"delivered": 2, "failed": 0}
        assert pipeline.retry_write_backs() == {"delivered": 0, "failed": 0}
        written = on_sekmet(server, pid)
        assert sorted(r["id"] for r in written) == sorted(r["id"] for r in stored)
        assert {r["meta"]["versionId"] for r in written} == {"1"}     # arrived exactly once
        for resource in stored:
            [row] = pipeline.store.outbox(resource_id=resource["id"])
            assert (row.status, row.attempts) == ("delivered", 2)
    finally:
        pipeline.close()
