"""$assess against a hospital FHIR server mocked at the transport: its faults become the right answers."""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from fhir_ai import codes
from fhir_ai.api.risk_assessments import WRITE_BACK_EXTENSION
from fhir_ai.app import create_app
from fhir_ai.config import DEFAULT_MAPPINGS, DEFAULT_MODELS, load_settings
from fhir_ai.fhir.client import FhirClient
from fhir_ai.fhir.sources import ServerSource
from fhir_ai.mapping import load_directory
from fhir_ai.models.registry import ModelRegistry
from fhir_ai.pipeline import Pipeline
from fhir_ai.store import Store

try:
    from .factories import encounter, fhir_time, operation_outcome, patient, searchset, sepsis_observations
except ImportError:
    from factories import (encounter, fhir_time, operation_outcome, patient,  # type: ignore[no-redef]
                           searchset, sepsis_observations)

BASE = "https://hospital.test/fhir"
EVIL = "https://elsewhere.test"
AS_OF = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)
AS_OF_PARAM = {"name": "asOf", "valueDateTime": fhir_time(AS_OF)}
FHIR_JSON = "application/fhir+json"
PATIENT = "pat-1"

Fault = tuple[int, dict[str, str], str] | Exception


class FakeHospital:
    """A hospital FHIR server at the transport: Patient read, Encounter/Observation search by GET or
    by POST [type]/_search with a form body (code filter, optional paging), RiskAssessment PUT.
    Queued faults are answered first; ``refuse_post`` (an answer) is given to every POST search."""

    def __init__(self, rsps: responses.RequestsMock) -> None:
        self.rsps = rsps
        self.resources: dict[str, dict[str, dict[str, Any]]] = {"Patient": {}, "Encounter": {},
                                                                "Observation": {}, "RiskAssessment": {}}
        self.faults: dict[str, list[Fault]] = {"Patient": [], "Encounter": [], "Observation": [], "PUT": []}
        self.puts: list[str] = []            # ids of every PUT that was stored
        self.page_size: int | None = None
        self.next_base = BASE                 # where next links point
        self.pages_served: list[str] = []     # _getpages tokens asked for
        self._pages: dict[str, list[list[dict[str, Any]]]] = {}
        self.refuse_post: Fault | None = None
        self.searches: list[tuple[str, str]] = []   # (method, query or form) of each first-page search
        rsps.add_callback(responses.GET, re.compile(re.escape(BASE) + r"/Patient/[^/?]+"), self._read)
        rsps.add_callback(responses.GET, f"{BASE}/Encounter", self._search)
        rsps.add_callback(responses.GET, f"{BASE}/Observation", self._search)
        rsps.add_callback(responses.POST, f"{BASE}/Encounter/_search", self._search)
        rsps.add_callback(responses.POST, f"{BASE}/Observation/_search", self._search)
        rsps.add_callback(responses.PUT, re.compile(re.escape(BASE) + r"/RiskAssessment/[^/?]+"), self._put)
        # A batch of reads (POST [base]) is answered only by a hospital that takes one; each entry by the same
        # callbacks as its own request (queued faults included: one becomes that entry's status).
        self.takes_batch = False
        self.faults["batch"] = []
        rsps.add_callback(responses.POST, BASE, self._batch)

    def add(self, *resources: dict[str, Any]) -> None:
        for resource in resources:
            self.resources[resource["resourceType"]][resource["id"]] = resource

    def fail(self, kind: str, *faults: Fault) -> None:
        self.faults[kind].extend(faults)

    def calls(self, fragment: str) -> list[str]:
        return [call.request.url for call in self.rsps.calls if fragment in call.request.url]

    # -- callbacks ----------------------------------------------------------------------------
    def _fault(self, kind: str) -> Fault | None:
        return self.faults[kind].pop(0) if self.faults[kind] else None

    @staticmethod
    def _ok(body: dict[str, Any], status: int = 200) -> tuple[int, dict[str, str], str]:
        return status, {"Content-Type": FHIR_JSON}, json.dumps(body)

    def _read(self, request: requests.PreparedRequest) -> Fault:
        fault = self._fault("Patient")
        if fault is not None:
            return fault
        pid = urlsplit(request.url).path.rsplit("/", 1)[1]
        if pid not in self.resources["Patient"]:
            return self._ok(operation_outcome(f"Resource Patient/{pid} is not known", "not-found"), 404)
        return self._ok(self.resources["Patient"][pid])

    def _search(self, request: requests.PreparedRequest) -> Fault:
        path = urlsplit(request.url).path
        rtype = path.rsplit("/", 2)[1] if path.endswith("/_search") else path.rsplit("/", 1)[1]
        if request.method == "POST" and self.refuse_post is not None:
            return self.refuse_post
        fault = self._fault(rtype)
        if fault is not None:
            return fault
        text = urlsplit(request.url).query
        if request.method == "POST":
            assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
            text = "&".join(q for q in (text, request.body.decode("ascii")) if q)
        query = parse_qs(text)
        if "_getpages" not in query:
            self.searches.append((request.method, text))
        if "_getpages" in query:
            token, page = query["_getpages"][0], int(query["_page"][0])
            self.pages_served.append(token)
            return self._page(rtype, token, page)
        subject = f"Patient/{query['patient'][0]}"
        wanted = set(query["code"][0].split(",")) if "code" in query else None
        found = [r for r in self.resources[rtype].values() if r["subject"]["reference"] == subject
                 and (wanted is None or any(f"{c['system']}|{c['code']}" in wanted for c in r["code"]["coding"]))]
        size = self.page_size or len(found) or 1
        token = uuid.uuid4().hex
        self._pages[token] = [found[i:i + size] for i in range(0, len(found), size)] or [[]]
        return self._page(rtype, token, 0)

    def _page(self, rtype: str, token: str, page: int) -> Fault:
        pages = self._pages[token]
        next_url = (f"{self.next_base}/{rtype}?_getpages={token}&_page={page + 1}"
                    if page + 1 < len(pages) else None)
        return self._ok(searchset(pages[page], BASE, next_url=next_url, total=sum(map(len, pages))))

    def _batch(self, request: requests.PreparedRequest) -> Fault:
        if not self.takes_batch:
            return self._ok(operation_outcome("POST [base] is not supported", "not-supported"), 405)
        fault = self._fault("batch")
        if fault is not None:
            return fault
        entries = []
        for item in json.loads(request.body)["entry"]:
            inner = requests.Request("GET", f"{BASE}/{item['request']['url']}").prepare()
            answer = (self._read if inner.path_url.startswith(urlsplit(BASE).path + "/Patient/") else self._search)(inner)
            if isinstance(answer, Exception):
                raise answer                              # a transport fault fails the whole batch
            status, _, body = answer
            entries.append({"resource": json.loads(body) if body else None, "response": {"status": str(status)}})
        return self._ok({"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    def _put(self, request: requests.PreparedRequest) -> Fault:
        fault = self._fault("PUT")
        if fault is not None:
            return fault
        resource = json.loads(request.body)
        created = resource["id"] not in self.resources["RiskAssessment"]
        self.resources["RiskAssessment"][resource["id"]] = resource
        self.puts.append(resource["id"])
        return self._ok(resource, 201 if created else 200)


@pytest.fixture
def hospital() -> Iterator[FakeHospital]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake = FakeHospital(rsps)
        fake.add(patient(id=PATIENT), encounter(PATIENT, id="enc-1",
                                                 period={"start": fhir_time(AS_OF - timedelta(days=1))}))
        fake.add(*sepsis_observations(PATIENT, "enc-1", last=AS_OF - timedelta(minutes=15)))
        yield fake


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry.load(DEFAULT_MODELS, load_directory(DEFAULT_MAPPINGS))


@pytest.fixture
def sleeps() -> list[float]:
    """Every back-off the client asked for (nothing really sleeps)."""
    return []


@pytest.fixture
def app(settings_overrides: dict[str, Any], registry: ModelRegistry, sleeps: list[float],
        hospital: FakeHospital) -> Iterator[Flask]:
    settings = load_settings({**settings_overrides, "source_url": BASE, "write_back": True}, environ={})
    client = FhirClient(BASE, timeout=settings.source_timeout, retries=settings.source_retries,
                        retry_after_cap=settings.source_retry_after_cap, sleep=sleeps.append)
    pipeline = Pipeline(settings, registry, ServerSource(client), Store(settings.effective_database_url))
    yield create_app(settings=settings, pipeline=pipeline)
    pipeline.close()


@pytest.fixture
def attempts(app: Flask) -> int:
    return app.config["FHIR_AI"].source_retries + 1


def assess(client: FlaskClient, *parameters: dict[str, Any], patient_id: str = PATIENT,
           body: str | None = None, content_type: str = FHIR_JSON) -> TestResponse:
    """POST $assess (as of AS_OF unless the body is given); no answer may show a stack trace."""
    if body is None:
        body = json.dumps({"resourceType": "Parameters", "parameter": [AS_OF_PARAM, *parameters]})
    response = client.post(f"/Patient/{patient_id}/$assess", data=body, content_type=content_type)
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and 'File "' not in text and "fhir_ai/" not in text
    return response


def assessments(response: TestResponse) -> list[dict[str, Any]]:
    return [e["resource"] for e in response.get_json()["entry"]
            if e["resource"]["resourceType"] == "RiskAssessment"]


def issues(response: TestResponse) -> list[dict[str, Any]]:
    return [issue for e in response.get_json()["entry"] if e["resource"]["resourceType"] == "OperationOutcome"
            for issue in e["resource"]["issue"]]


def error(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] in ("error", "fatal")
    return body["issue"][0]


# -- reading from the hospital -------------------------------------------------------------------

def test_healthy_hospital_gives_a_final_assessment(client: FlaskClient, hospital: FakeHospital) -> None:
    response = assess(client)
    assert response.status_code == 200
    model, news2 = assessments(response)
    assert model["status"] == "final" and 0 <= model["prediction"][0]["probabilityDecimal"] <= 1
    assert {b["reference"] for b in model["basis"]} == {f"Observation/{oid}" for oid in hospital.resources["Observation"]}
    assert model["method"]["coding"][0]["code"] == "deterioration"
    assert news2["method"]["coding"][0]["system"] == codes.MODEL_SYSTEM
    assert news2["method"]["coding"][0]["code"] != "deterioration"   # a rule score, not the model
    assert issues(response) == []


def test_unknown_patient_is_our_404_with_the_hospital_text(client: FlaskClient, hospital: FakeHospital) -> None:
    issue = error(assess(client, patient_id="nobody"), 404)
    assert issue["code"] == "not-found"
    assert issue["details"]["text"] == "Resource Patient/nobody is not known"
    assert "Resource Patient/nobody is not known" in issue["diagnostics"]
    assert hospital.calls("/Encounter") == []     # nothing else is fetched for an unknown patient


def test_429_with_retry_after_then_success(client: FlaskClient, hospital: FakeHospital,
                                           sleeps: list[float]) -> None:
    hospital.fail("Patient", (429, {"Retry-After": "7", "Content-Type": FHIR_JSON},
                              json.dumps(operation_outcome("slow down", "throttled"))))
    response = assess(client)
    assert response.status_code == 200
    assert assessments(response)[0]["status"] == "final"
    assert sleeps == [7.0]                          # waited what the server asked, once
    assert len(hospital.calls(f"/Patient/{PATIENT}")) == 2


def test_503_every_time_is_502(client: FlaskClient, hospital: FakeHospital, attempts: int,
                               sleeps: list[float]) -> None:
    body = json.dumps(operation_outcome("maintenance window", "transient"))
    hospital.fail("Patient", *[(503, {"Content-Type": FHIR_JSON}, body)] * attempts)
    issue = error(assess(client), 502)
    assert issue["code"] == "transient"
    assert "HTTP 503" in issue["diagnostics"] and "maintenance window" in issue["diagnostics"]
    assert len(hospital.calls(f"/Patient/{PATIENT}")) == attempts
    assert sleeps == [1.0, 2.0, 4.0][:attempts - 1]


def test_read_timeouts_are_504(client: FlaskClient, hospital: FakeHospital, attempts: int) -> None:
    hospital.fail("Observation", *[requests.ReadTimeout("read timed out")] * attempts)
    issue = error(assess(client), 504)
    assert issue["code"] == "timeout"
    assert len(hospital.calls("/Observation")) == attempts


def test_malformed_json_is_retried_once_then_502(client: FlaskClient, hospital: FakeHospital, attempts: int) -> None:
    """A whole answer that is not JSON (a proxy's error page) may pass: tried once more, not as a 503 is."""
    page = "<html><body>502 Bad Gateway</body></html>"
    hospital.fail("Encounter", *[(200, {"Content-Type": "text/html"}, page)] * attempts)
    issue = error(assess(client), 502)
    assert "not JSON" in issue["diagnostics"] and "not retried further" in issue["diagnostics"]
    assert len(hospital.calls("/Encounter")) == 2


def test_nan_in_an_answer_is_502_naming_the_path_without_the_query(client: FlaskClient, hospital: FakeHospital,
                                                                   attempts: int) -> None:
    """NaN is no JSON: the server sends it again on every try. The OperationOutcome names the path
    asked for, never the query (it holds the patient's id)."""
    body = '{"resourceType": "Bundle", "type": "searchset", "total": NaN, "entry": []}'
    hospital.fail("Encounter", *[(200, {"Content-Type": FHIR_JSON}, body)] * attempts)
    issue = error(assess(client), 502)
    assert issue["diagnostics"].startswith("GET /fhir/Encounter: ") and "not JSON" in issue["diagnostics"]
    assert PATIENT not in issue["diagnostics"] and "?" not in issue["diagnostics"]
    assert len(hospital.calls("/Encounter")) == 2


def test_an_answer_that_breaks_off_every_time_is_retried_then_502(client: FlaskClient, hospital: FakeHospital,
                                                                  attempts: int) -> None:
    cut = '{"resourceType": "Bundle", "type": "searchset", "entr'
    hospital.fail("Encounter", *[(200, {"Content-Type": FHIR_JSON}, cut)] * attempts)
    issue = error(assess(client), 502)
    assert issue["code"] == "transient" and "breaks off" in issue["diagnostics"]
    assert len(hospital.calls("/Encounter")) == attempts


def test_malformed_json_once_is_retried_to_success(client: FlaskClient, hospital: FakeHospital) -> None:
    hospital.fail("Encounter", (200, {"Content-Type": FHIR_JSON}, '{"resourceType": "Bundle", "entr'))
    assert assess(client).status_code == 200
    assert len(hospital.calls("/Encounter")) == 2


def test_observation_search_is_retried_with_the_same_compact_query(client: FlaskClient, hospital: FakeHospital,
                                                                   registry: ModelRegistry,
                                                                   sleeps: list[float]) -> None:
    """The Observation search goes as one POST _search, its code list escaped once and cached: a retry (a
    search is a read) sends the very same form, and the hospital gets every code of the mapping, with
    ':', '/' and ',' as FHIR writes them."""
    hospital.fail("Observation", (503, {"Content-Type": FHIR_JSON}, json.dumps(operation_outcome("busy", "transient"))))
    for _ in range(2):                              # the second $assess uses the cached code list
        assert assess(client).status_code == 200
    assert hospital.calls("/Observation?") == []     # no GET: not one search split by URL length
    posts = [call.request for call in hospital.rsps.calls if call.request.url == f"{BASE}/Observation/_search"]
    first, retried, again = [request.body for request in posts]
    assert first == retried == again
    assert sleeps == [1.0]
    assert b"code=http://loinc.org%7C" in first and b"%3A" not in first and b"%2C" not in first
    wanted = {f"{system}|{code}" if system else code for system, code in registry.get("deterioration")[1].query_codes()}
    assert set(parse_qs(first.decode())["code"][0].split(",")) == wanted
    assert parse_qs(first.decode())["patient"] == [PATIENT]


@pytest.fixture
def get_only(hospital: FakeHospital) -> FakeHospital:
    """A hospital whose server answers POST _search with 405 (searched by GET after the first try)."""
    hospital.refuse_post = (405, {"Content-Type": FHIR_JSON},
                            json.dumps(operation_outcome("POST search is not allowed", "not-supported")))
    return hospital


def test_observation_search_by_get_is_retried_with_the_same_compact_query(
        client: FlaskClient, get_only: FakeHospital, registry: ModelRegistry, sleeps: list[float]) -> None:
    """Where the server refuses POST _search: the GET form, escaped once and cached, and a retry sends
    the very same URL, every code of the mapping, with ':', '/' and ',' as FHIR writes them."""
    hospital = get_only
    hospital.fail("Observation", (503, {"Content-Type": FHIR_JSON}, json.dumps(operation_outcome("busy", "transient"))))
    for _ in range(2):                              # the second $assess uses the cached code list
        assert assess(client).status_code == 200
    assert len(hospital.calls("/Observation/_search")) == 1       # refused once, then GET only
    first, retried, again = [url for url in hospital.calls("/Observation?") if "_getpages" not in url]
    assert first == retried == again
    assert sleeps == [1.0]
    assert "code=http://loinc.org%7C" in first and "%3A" not in first and "%2C" not in first
    wanted = {f"{system}|{code}" if system else code for system, code in registry.get("deterioration")[1].query_codes()}
    assert set(parse_qs(urlsplit(first).query)["code"][0].split(",")) == wanted


def test_post_and_get_searches_give_the_same_assessment(settings_overrides: dict[str, Any], registry: ModelRegistry,
                                                        hospital: FakeHospital) -> None:
    """The same chart read by POST _search and (server refusing it) by GET: the same Observations, so
    the same RiskAssessments but for their ids and times of making."""
    answers = []
    for refuse in (None, (501, {"Content-Type": FHIR_JSON}, json.dumps(operation_outcome("no", "not-supported")))):
        hospital.refuse_post = refuse
        settings = load_settings({**settings_overrides, "source_url": BASE, "write_back": False}, environ={})
        pipeline = Pipeline(settings, registry, ServerSource(FhirClient(BASE, retries=0)),
                            Store(settings.effective_database_url))
        try:
            answers.append(pipeline.fetch(PATIENT, ["deterioration"], AS_OF))
        finally:
            pipeline.close()
    by_post, by_get = answers
    assert [method for method, query in hospital.searches if "code=" in query] == ["POST", "GET"]
    assert sorted(json.dumps(r, sort_keys=True) for r in by_post) == sorted(json.dumps(r, sort_keys=True) for r in by_get)
    assert len([r for r in by_post if r["resourceType"] == "Observation"]) == len(hospital.resources["Observation"])


def test_observation_search_follows_next_pages(client: FlaskClient, hospital: FakeHospital) -> None:
    hospital.page_size = 5
    response = assess(client)
    assert response.status_code == 200
    assert hospital.pages_served                    # at least one search ran over more than one page
    model = assessments(response)[0]
    assert {b["reference"] for b in model["basis"]} == {f"Observation/{oid}" for oid in hospital.resources["Observation"]}


def test_next_link_to_another_host_is_refused(client: FlaskClient, hospital: FakeHospital) -> None:
    hospital.page_size = 5
    hospital.next_base = f"{EVIL}/fhir"
    stolen = hospital.rsps.add(responses.GET, re.compile(re.escape(EVIL) + ".*"), json={})
    issue = error(assess(client), 502)
    assert "another host" in issue["diagnostics"]
    assert stolen.call_count == 0
    assert hospital.calls(EVIL) == []
    assert hospital.puts == []                      # nothing was assessed, so nothing written


# -- writing back ------------------------------------------------------------------------------

def write_back_status(client: FlaskClient, resource_id: str) -> dict[str, Any]:
    resource = client.get(f"/RiskAssessment/{resource_id}").get_json()
    [ext] = [e for e in resource.get("extension", []) if e["url"] == WRITE_BACK_EXTENSION]
    return {part["url"]: next(v for k, v in part.items() if k.startswith("value")) for part in ext["extension"]}


def test_failed_write_back_is_stored_queued_and_delivered_later(app: Flask, client: FlaskClient,
                                                                hospital: FakeHospital, sleeps: list[float]) -> None:
    error_body = json.dumps(operation_outcome("database unavailable", "exception"))
    # A waiting request makes one attempt per resource (no back-off): the queue retries later.
    hospital.fail("PUT", *[(500, {"Content-Type": FHIR_JSON}, error_body)] * 2)
    response = assess(client)
    assert sleeps == []
    assert response.status_code == 200
    stored = assessments(response)
    assert len(stored) == 2                         # the model's and the NEWS2 companion
    warnings = issues(response)
    assert len(warnings) == 2 and {w["severity"] for w in warnings} == {"warning"}
    assert all("queued for retry" in w["diagnostics"] for w in warnings)
    assert hospital.puts == []
    for resource in stored:
        state = write_back_status(client, resource["id"])
        assert state["status"] == "pending" and state["attempts"] == 1
        assert "database unavailable" in state["lastError"]

    pipeline: Pipeline = app.extensions["fhir_ai"]
    assert pipeline.retry_write_backs() == {"delivered": 2, "failed": 0}
    assert sorted(hospital.puts) == sorted(r["id"] for r in stored)
    for resource in stored:
        [row] = pipeline.store.outbox(resource_id=resource["id"])
        assert (row.status, row.attempts, row.last_error) == ("delivered", 2, None)
        sent = hospital.resources["RiskAssessment"][resource["id"]]
        assert "versionId" not in sent.get("meta", {})   # the hospital keeps its own versions
    assert pipeline.retry_write_backs() == {"delivered": 0, "failed": 0}
    assert assess(client).status_code == 200         # a repeat finds it delivered: no second PUT
    assert len(hospital.puts) == 2


# -- bad requests ------------------------------------------------------------------------------

def _parameters(*parameters: dict[str, Any]) -> str:
    return json.dumps({"resourceType": "Parameters", "parameter": list(parameters)})


@pytest.mark.parametrize("body, content_type, status, expression", [
    pytest.param(_parameters({"name": "modle", "valueCode": "deterioration"}), FHIR_JSON, 400,
                 "Parameters.parameter[0].name", id="unknown-parameter"),
    pytest.param(_parameters({"name": "writeBack", "valueBoolean": "true"}), FHIR_JSON, 400,
                 "Parameters.parameter[0].valueBoolean", id="writeBack-string-value"),
    pytest.param(_parameters({"name": "writeBack", "valueString": "true"}), FHIR_JSON, 400,
                 "Parameters.parameter[0]", id="writeBack-valueString"),
    pytest.param(_parameters({"name": "writeBack", "valueBoolean": False},
                             {"name": "asOf", "valueDateTime": "2026-11-20T08:00:00"}),
                 FHIR_JSON, 400, "Parameters.parameter[1].valueDateTime", id="asOf-without-timezone"),
    pytest.param(_parameters(AS_OF_PARAM, AS_OF_PARAM), FHIR_JSON, 400, "Parameters.parameter[1]",
                 id="asOf-twice"),
    pytest.param(_parameters({"name": "model", "valueCode": "no-such-model"}), FHIR_JSON, 400,
                 "Parameters.parameter.where(name='model')", id="unknown-model"),
    pytest.param('{"resourceType": "Parameters", "parameter": [', FHIR_JSON, 400, "Parameters", id="body-not-json"),
    pytest.param(json.dumps({"resourceType": "Patient", "id": PATIENT}), FHIR_JSON, 400, "resourceType",
                 id="wrong-resourceType"),
    pytest.param(_parameters(AS_OF_PARAM), "text/plain", 415, None, id="text-plain"),
])
def test_bad_parameters_name_the_offending_path(client: FlaskClient, hospital: FakeHospital, body: str,
                                                content_type: str, status: int, expression: str | None) -> None:
    issue = error(assess(client, body=body, content_type=content_type), status)
    assert issue["code"] in ("invalid", "not-supported")
    if expression is None:          # a header at fault: named as R4 names one, in location
        assert "expression" not in issue and issue["location"] == ["http.Content-Type"]
    else:                           # a body that is no JSON at all: the resource it should have been
        assert issue["expression"] == [expression]
    assert len(hospital.rsps.calls) == 0            # refused before anything was fetched


def test_read_shows_a_delivered_write_back(client: FlaskClient, hospital: FakeHospital) -> None:
    [model, _] = assessments(assess(client))
    assert hospital.puts                            # delivered at once
    response = client.get(f"/RiskAssessment/{model['id']}")
    assert response.status_code == 200, response.get_data(as_text=True)
    state = write_back_status(client, model["id"])
    assert state["status"] == "delivered" and state["attempts"] == 1
    assert state["deliveredAt"].endswith("Z")
