"""$assess through a batch-taking hospital mocked at the transport: the batch changes the number of round trips,
never the answer. Faults in the batch or in one of its entries end as they end without a batch."""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from fhir_ai.app import create_app
from fhir_ai.config import load_settings
from fhir_ai.fhir.client import FhirClient
from fhir_ai.fhir.sources import ServerSource
from fhir_ai.models.registry import ModelRegistry
from fhir_ai.pipeline import Pipeline
from fhir_ai.store import Store

try:
    from .test_upstream_faults import (BASE, FHIR_JSON, PATIENT, FakeHospital, assess, assessments, error,  # noqa: F401
                                       hospital, registry)
except ImportError:
    from test_upstream_faults import (BASE, FHIR_JSON, PATIENT, FakeHospital, assess,  # type: ignore[no-redef]  # noqa: F401
                                      assessments, error, hospital, registry)


@pytest.fixture
def batching(settings_overrides: dict[str, Any], registry: ModelRegistry, hospital: FakeHospital) -> Iterator[Flask]:
    """The app on a hospital that takes batches, batch=True (its answers not checked against separate requests:
    tests/test_batch_record.py checks that), retries without sleeping."""
    hospital.takes_batch = True
    settings = load_settings({**settings_overrides, "source_url": BASE, "write_back": False}, environ={})
    client = FhirClient(BASE, retries=settings.source_retries, sleep=lambda seconds: None)
    pipeline = Pipeline(settings, registry, ServerSource(client, batch=True, check=False),
                        Store(settings.effective_database_url))
    yield create_app(settings=settings, pipeline=pipeline)
    pipeline.close()


@pytest.fixture
def client(batching: Flask) -> FlaskClient:
    return batching.test_client()


def sent(hospital: FakeHospital) -> list[tuple[str, str]]:
    return [(call.request.method, call.request.path_url.split("?")[0]) for call in hospital.rsps.calls]


def test_one_round_trip_gives_the_assessment_the_separate_requests_give(
        client: FlaskClient, hospital: FakeHospital, settings_overrides: dict[str, Any],
        registry: ModelRegistry, tmp_path: Any) -> None:
    batched = assess(client)
    assert batched.status_code == 200, batched.get_data(as_text=True)
    assert sent(hospital) == [("POST", "/fhir")]
    # the same hospital read by separate requests, into another store: the same assessments, input for input
    other = f"sqlite:///{tmp_path / 'separate.sqlite3'}"
    settings = load_settings({**settings_overrides, "source_url": BASE, "write_back": False,
                              "database_url": other}, environ={})
    pipeline = Pipeline(settings, registry, ServerSource(FhirClient(BASE, retries=0)), Store(other))
    try:
        hospital.rsps.calls.reset()
        separate = assess(create_app(settings=settings, pipeline=pipeline).test_client())
        assert [m for m, _ in sent(hospital)] == ["GET", "GET", "POST"]
    finally:
        pipeline.close()
    drop = ("meta",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in assessments(batched)]
            == [{k: v for k, v in r.items() if k not in drop} for r in assessments(separate)])
    assert assessments(batched)[0]["status"] == "final"


def test_an_unknown_patient_is_404_as_ever(client: FlaskClient, hospital: FakeHospital) -> None:
    issue = error(assess(client, patient_id="nobody"), 404)
    assert "nobody" in issue["diagnostics"]
    assert sent(hospital) == [("POST", "/fhir"), ("GET", "/fhir/Patient/nobody")]


@pytest.mark.parametrize("fault", [
    (503, {}, ""), (500, {"Content-Type": FHIR_JSON}, '{"resourceType": "OperationOutcome", "issue": []}'),
    (200, {"Content-Type": FHIR_JSON}, '{"resourceType": "Bundle", "type": "batch-resp'),
    (200, {"Content-Type": "text/html"}, "<html>proxy error</html>"),
    requests.ReadTimeout("slow"), requests.ConnectionError("reset"),
])
def test_a_failed_batch_is_read_by_separate_requests(client: FlaskClient, hospital: FakeHospital, fault) -> None:
    hospital.fail("batch", fault)
    response = assess(client)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert assessments(response)[0]["status"] == "final"
    assert sent(hospital) == [("POST", "/fhir"), ("GET", f"/fhir/Patient/{PATIENT}"), ("GET", "/fhir/Encounter"),
                              ("POST", "/fhir/Observation/_search")]


def test_a_failed_entry_means_the_record_is_read_separately_with_retries(client: FlaskClient, hospital: FakeHospital) -> None:
    hospital.fail("Observation", (503, {}, ""), (503, {}, ""))     # the entry's, then the search's first try
    response = assess(client)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert assessments(response)[0]["status"] == "final"
    assert sent(hospital) == [("POST", "/fhir"), ("GET", f"/fhir/Patient/{PATIENT}"), ("GET", "/fhir/Encounter"),
                              ("POST", "/fhir/Observation/_search"), ("POST", "/fhir/Observation/_search")]


def test_a_hospital_down_for_everything_is_a_502_not_a_silent_no_risk(client: FlaskClient,
                                                                      hospital: FakeHospital) -> None:
    hospital.fail("batch", (503, {}, ""))
    hospital.fail("Patient", *[(503, {}, "")] * 10)
    issue = error(assess(client), 502)
    assert "Patient" in issue["diagnostics"] and "503" in json.dumps(issue)
