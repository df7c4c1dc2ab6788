"""A patient's record in one FHIR batch (ServerSource.record): what is sent, what is read back, and every
way the server can decline or half-answer it (the batch is an optimisation, never a new way to fail)."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
import responses

from fhir_ai.config import load_settings
from fhir_ai.errors import BadRequest, ConfigurationError, UpstreamError, UpstreamNotFound
from fhir_ai.fhir import ServerSource, make_source
from fhir_ai.fhir.client import FhirClient
from fhir_ai.fhir.sources import BATCH_OFF_FOR, BATCH_PROBE_RETRY, declares_batch

BASE = "https://fhir.hospital.example/r4"
LOINC = "http://loinc.org"
HR, RR = (LOINC, "8867-4"), (LOINC, "9279-1")
SINCE, UNTIL = datetime(2024, 5, 5, tzinfo=timezone.utc), datetime(2024, 5, 6, 12, tzinfo=timezone.utc)
PATIENT = {"resourceType": "Patient", "id": "pat-1", "birthDate": "1950-03-01"}
ENCOUNTER = {"resourceType": "Encounter", "id": "enc-1", "status": "in-progress",
             "class": {"code": "IMP"}, "subject": {"reference": "Patient/pat-1"}}
CAPABILITIES = {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                "rest": [{"mode": "server", "interaction": [{"code": "transaction"}, {"code": "batch"}]}]}
NO_BATCH = {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
            "rest": [{"mode": "server", "interaction": [{"code": "transaction"}]}]}


def obs(oid: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}]}, "subject": {"reference": "Patient/pat-1"},
            "effectiveDateTime": "2024-05-06T10:00:00Z", "valueQuantity": {"value": 90, "unit": "/min"}}


def searchset(*resources: dict[str, Any], next_url: str | None = None) -> dict[str, Any]:
    page: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        page["link"] = [{"relation": "next", "url": next_url}]
    return page


def entry(resource: dict[str, Any] | None, status: str = "200 OK") -> dict[str, Any]:
    out: dict[str, Any] = {"response": {"status": status}}
    if resource is not None:
        out["resource"] = resource
    return out


def batch_response(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "batch-response", "entry": list(entries)}


NOT_FOUND = {"resourceType": "OperationOutcome",
             "issue": [{"severity": "error", "code": "not-found", "diagnostics": "Patient/pat-1 is not known"}]}
WHOLE = batch_response(entry(PATIENT), entry(searchset(ENCOUNTER)), entry(searchset(obs("o1"), obs("o2"))))


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def source(batch: bool | None = True, retries: int = 0, check: bool = False) -> ServerSource:
    """A source on BASE; ``check`` off unless a test is about it (each test here is about one batch)."""
    return ServerSource(FhirClient(BASE, retries=retries, sleep=lambda seconds: None), batch=batch, check=check)


def sent(rsps: responses.RequestsMock) -> list[tuple[str, str]]:
    return [(call.request.method, urlsplit(call.request.url).path) for call in rsps.calls]


def ids(resources: list[dict[str, Any]]) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in resources]


def test_one_batch_reads_the_whole_record(rsps):
    rsps.post(BASE, json=WHOLE)
    record = source().record("pat-1", [HR, RR], since=SINCE, until=UNTIL)
    assert ids(record) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1", "Observation/o2"]
    assert sent(rsps) == [("POST", "/r4")]
    batch = json.loads(rsps.calls[0].request.body)
    assert rsps.calls[0].request.headers["Content-Type"] == "application/fhir+json"
    assert batch["resourceType"] == "Bundle" and batch["type"] == "batch"
    requests_ = [item["request"] for item in batch["entry"]]
    assert [r["method"] for r in requests_] == ["GET", "GET", "GET"]
    assert requests_[0]["url"] == "Patient/pat-1"
    path, _, query = requests_[1]["url"].partition("?")
    assert path == "Encounter" and parse_qs(query) == {"patient": ["pat-1"], "_count": ["100"]}
    path, _, query = requests_[2]["url"].partition("?")
    # the same search as the GET and POST _search forms: every code in one 'code' value, both dates
    assert path == "Observation" and parse_qs(query) == {
        "patient": ["pat-1"], "date": ["ge2024-05-05T00:00:00Z", "le2024-05-06T12:00:00Z"], "_count": ["200"],
        "code": [f"{LOINC}|8867-4,{LOINC}|9279-1"]}


def test_the_batch_finds_what_the_separate_requests_find(rsps):
    """The same server answering both ways: the same record, in the same order."""
    rsps.post(BASE, json=WHOLE)
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1"), obs("o2")))
    assert source(batch=True).record("pat-1", [HR]) == source(batch=False).record("pat-1", [HR])
    assert sent(rsps) == [("POST", "/r4"), ("GET", "/r4/Patient/pat-1"), ("GET", "/r4/Encounter"),
                          ("POST", "/r4/Observation/_search")]


def test_no_codes_asks_for_no_observations(rsps):
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset(ENCOUNTER))))
    assert ids(source().record("pat-1", [])) == ["Patient/pat-1", "Encounter/enc-1"]
    assert len(json.loads(rsps.calls[0].request.body)["entry"]) == 2


def test_next_pages_of_a_search_in_the_batch_are_read_by_get(rsps):
    rsps.post(BASE, json=batch_response(
        entry(PATIENT), entry(searchset(ENCOUNTER)),
        entry(searchset(obs("o1"), next_url=f"{BASE}/Observation?page=2"))))
    rsps.get(f"{BASE}/Observation", json=searchset(obs("o1"), obs("o2")))      # live paging may repeat one
    assert ids(source().record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1",
                                                   "Observation/o2"]
    assert sent(rsps) == [("POST", "/r4"), ("GET", "/r4/Observation")]
    assert parse_qs(urlsplit(rsps.calls[1].request.url).query) == {"page": ["2"]}


def test_a_next_link_to_another_host_is_not_followed_and_the_record_is_read_separately(rsps):
    """The batch's search links abroad: not followed (the token stays home), the record is read by the
    separate requests, whose own answer here links home."""
    rsps.post(BASE, json=batch_response(
        entry(PATIENT), entry(searchset(ENCOUNTER, next_url="https://elsewhere.example/Encounter?p=2")),
        entry(searchset(obs("o1")))))
    separate_requests_work(rsps)
    server = source()
    assert ids(server.record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1"]
    assert sent(rsps) == [("POST", "/r4"), *SEPARATE]
    assert server.batch is True


def test_a_next_link_to_another_host_in_the_separate_search_too_is_its_error(rsps):
    rsps.post(BASE, json=batch_response(
        entry(PATIENT), entry(searchset(ENCOUNTER, next_url="https://elsewhere.example/Encounter?p=2")),
        entry(searchset(obs("o1")))))
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER, next_url="https://elsewhere.example/Encounter?p=2"))
    with pytest.raises(UpstreamError, match="another host"):
        source().record("pat-1", [HR])
    assert sent(rsps) == [("POST", "/r4"), ("GET", "/r4/Patient/pat-1"), ("GET", "/r4/Encounter")]


@pytest.mark.parametrize("fault", [{"status": 404, "json": NOT_FOUND}, {"status": 410, "json": NOT_FOUND},
                                   {"status": 400, "json": NOT_FOUND}, {"status": 200, "json": PATIENT}])
def test_a_next_page_of_the_batch_s_search_that_fails_means_the_record_is_read_separately(rsps, fault):
    """A next page gone (an expired paging cursor), refused, or not a Bundle: the separate requests read the
    record from its start (with their own retries); the batch half-answered, counted (three in a row pause)."""
    rsps.post(BASE, json=batch_response(
        entry(PATIENT), entry(searchset(ENCOUNTER)),
        entry(searchset(obs("o1"), next_url=f"{BASE}/Observation?page=2"))))
    rsps.get(f"{BASE}/Observation", **fault)
    separate_requests_work(rsps)
    server = source()
    for attempt in range(1, 4):
        rsps.calls.reset()
        assert ids(server.record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1"]
        assert sent(rsps) == [("POST", "/r4"), ("GET", "/r4/Observation"), *SEPARATE]
        assert server.batch is (attempt < 3)


@pytest.mark.parametrize("fault", [{"status": 503}, {"body": requests.ReadTimeout("slow")}])
def test_a_next_page_that_fails_on_the_server_counts_as_a_failed_batch(rsps, fault):
    """5xx or no answer on a next page (after the client's retries): a failed batch, counted even when the
    separate requests then fail too, and their error is the one reported."""
    rsps.post(BASE, json=batch_response(
        entry(PATIENT), entry(searchset(ENCOUNTER)),
        entry(searchset(obs("o1"), next_url=f"{BASE}/Observation?page=2"))))
    rsps.get(f"{BASE}/Observation", **fault)
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", status=503)
    server = source()
    for attempt in range(1, 4):
        with pytest.raises(UpstreamError) as caught:
            server.record("pat-1", [HR])
        assert "POST /r4/Observation/_search" in str(caught.value)
        assert server.batch is (attempt < 3)


def test_a_search_in_the_batch_cut_short_before_its_total_means_the_record_is_read_separately(rsps):
    """A server that caps searches inside a batch (HAPI's maximumSearchResultCountInTransaction) ends the
    search without a next link; its total says more matched: the separate searches read them all."""
    cut = {**searchset(obs("o1")), "total": 3}
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset(ENCOUNTER)), entry(cut)))
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json={**searchset(obs("o1"), obs("o2"), obs("o3")), "total": 3})
    server = source()
    assert ids(server.record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1",
                                                 "Observation/o2", "Observation/o3"]
    assert sent(rsps) == [("POST", "/r4"), *SEPARATE]
    assert server.batch is True


@pytest.mark.parametrize("pages", [
    [[obs("o1"), obs("o2")], [obs("o2")]],                           # a repeat across pages fills no gap
    [[obs("o1"), {"resourceType": "Practitioner", "id": "pr1"}]],    # nor does a resource of another type
])
def test_a_search_cut_short_is_told_by_its_distinct_matches(rsps, pages):
    """total counts matches, each once: repeats and resources of other types (included ones) are not
    matches, so a search holding two distinct Observations of a total of three was cut short."""
    first = {**searchset(*pages[0], next_url=f"{BASE}/Observation?page=2" if len(pages) > 1 else None),
             "total": 3}
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset(ENCOUNTER)), entry(first)))
    if len(pages) > 1:
        rsps.get(f"{BASE}/Observation", json=searchset(*pages[1]))
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json={**searchset(obs("o1"), obs("o2"), obs("o3")), "total": 3})
    assert ids(source().record("pat-1", [HR]))[2:] == ["Observation/o1", "Observation/o2", "Observation/o3"]
    assert sent(rsps)[-3:] == SEPARATE


def test_a_next_page_of_the_batch_is_asked_for_once_whatever_the_retries(rsps):
    """The batch is tried once: its next pages too (the separate requests have the retries)."""
    rsps.post(BASE, json=batch_response(
        entry(PATIENT), entry(searchset(ENCOUNTER)),
        entry(searchset(obs("o1"), next_url=f"{BASE}/Observation?page=2"))))
    rsps.get(f"{BASE}/Observation", status=503)
    separate_requests_work(rsps)
    assert ids(source(retries=3).record("pat-1", [HR]))[2:] == ["Observation/o1"]
    assert sent(rsps) == [("POST", "/r4"), ("GET", "/r4/Observation"), *SEPARATE]


@pytest.mark.parametrize("bad", [["not an object"], [{"resource": "text"}], [{"resource": obs("o1"), "search": "x"}],
                                 {"resource": obs("o1")}])
def test_a_searchset_whose_entries_are_not_objects_means_the_record_is_read_separately(rsps, bad):
    page = {**searchset(), "entry": bad}
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset(ENCOUNTER)), entry(page)))
    separate_requests_work(rsps)
    assert ids(source().record("pat-1", [HR]))[2:] == ["Observation/o1"]
    assert sent(rsps) == [("POST", "/r4"), *SEPARATE]


def test_a_search_in_the_batch_read_to_its_total_over_pages_is_used(rsps):
    first = {**searchset(obs("o1"), next_url=f"{BASE}/Observation?page=2"), "total": 2}
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry({**searchset(ENCOUNTER), "total": 1}),
                                        entry(first)))
    rsps.get(f"{BASE}/Observation", json=searchset(obs("o2")))
    assert ids(source().record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1",
                                                   "Observation/o2"]
    assert sent(rsps) == [("POST", "/r4"), ("GET", "/r4/Observation")]


def test_an_unknown_patient_is_the_read_s_own_not_found(rsps):
    """The batch says 404 for the Patient: the read of its own gives the server's words, as without a batch."""
    rsps.post(BASE, json=batch_response(entry(NOT_FOUND, "404 Not Found"), entry(searchset()),
                                        entry(searchset())))
    rsps.get(f"{BASE}/Patient/pat-1", status=404, json=NOT_FOUND)
    with pytest.raises(UpstreamNotFound, match="GET /r4/Patient/pat-1.*is not known"):
        source().record("pat-1", [HR])
    assert sent(rsps) == [("POST", "/r4"), ("GET", "/r4/Patient/pat-1")]


@pytest.mark.parametrize("answer", [
    entry(searchset(obs("o1")), "400 Bad Request"),                  # an error status
    entry(NOT_FOUND, "500"),
    entry(obs("o1")),                                                # not a Bundle
    entry({"resourceType": "Bundle", "type": "collection"}),         # not a searchset
    entry(None),                                                     # nothing
    entry(searchset(obs("o1")), "OK"),                               # no status code
    {"resource": searchset(obs("o1"))},                              # no response at all
])
def test_an_entry_not_answered_as_asked_means_the_whole_record_is_read_separately(rsps, answer):
    """All or nothing: a batch with one entry not answered as asked is not used at all."""
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset(ENCOUNTER)), answer))
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o9")))
    server = source()
    assert ids(server.record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o9"]
    assert sent(rsps) == [("POST", "/r4"), *SEPARATE]
    assert server.batch is True                                         # one half answer pauses nothing


@pytest.mark.parametrize("patient", [entry(NOT_FOUND, "500"), entry(NOT_FOUND),
                                     entry({"resourceType": "Bundle", "type": "searchset"}),
                                     entry({"resourceType": "Patient", "id": "someone-else"}),
                                     entry({"resourceType": "Patient"})])
def test_a_patient_entry_that_is_not_this_patient_means_none_of_the_answer_is_used(rsps, caplog, patient):
    """Not this Patient (an error, another patient - a cache in between keyed by POST [base]'s URL would
    answer with the last patient's record): none of the answer is used, not its Encounters nor Observations,
    even when they are someone else's; the record is read by separate requests; three in a row pause batching."""
    other = "Patient/someone-else"
    rsps.post(BASE, json=batch_response(
        patient, entry(searchset({**ENCOUNTER, "id": "enc-other", "subject": {"reference": other}})),
        entry(searchset({**obs("o-other"), "subject": {"reference": other}}))))
    separate_requests_work(rsps)
    server = source()
    with caplog.at_level(logging.INFO, logger="fhir_ai.fhir.sources"):
        for attempt in range(1, 4):
            rsps.calls.reset()
            assert ids(server.record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1"]
            assert sent(rsps) == [("POST", "/r4"), *SEPARATE]
            assert server.batch is (attempt < 3)
    assert "someone-else" not in caplog.text and "pat-1" not in caplog.text


@pytest.mark.parametrize("where", ["Encounter", "Observation"])
@pytest.mark.parametrize("reference", ["Patient/someone-else", f"{BASE}/Patient/someone-else",
                                       "Patient/someone-else/_history/2"])
def test_a_search_entry_naming_another_patient_means_none_of_the_answer_is_used(rsps, where, reference):
    """A server that ignored the entry's query (or a cache) answers with other patients' resources."""
    encounter_ = {**ENCOUNTER, "subject": {"reference": reference}} if where == "Encounter" else ENCOUNTER
    observation = {**obs("o-other"), "subject": {"reference": reference}} if where == "Observation" else obs("o1")
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset(encounter_)), entry(searchset(observation))))
    separate_requests_work(rsps)
    assert ids(source().record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1"]
    assert sent(rsps) == [("POST", "/r4"), *SEPARATE]


@pytest.mark.parametrize("reference", ["Patient/pat-1", f"{BASE}/Patient/pat-1", "urn:uuid:1234", "#p1"])
def test_references_to_this_patient_or_unresolvable_ones_are_used(rsps, reference):
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset(ENCOUNTER)),
                                        entry(searchset({**obs("o1"), "subject": {"reference": reference}}))))
    assert ids(source().record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1"]
    assert sent(rsps) == [("POST", "/r4")]


def test_a_failing_entry_every_time_pauses_batching(rsps):
    """A server whose batch answers every entry with an error costs four round trips per assessment only for
    three assessments, then batching pauses."""
    rsps.post(BASE, json=batch_response(entry(NOT_FOUND, "500"), entry(NOT_FOUND, "500"), entry(NOT_FOUND, "500")))
    separate_requests_work(rsps)
    server = source()
    for _ in range(3):
        server.record("pat-1", [HR])
    rsps.calls.reset()
    server.record("pat-1", [HR])
    assert sent(rsps) == SEPARATE and server.batch is False


@pytest.mark.parametrize("status", [400, 403, 404, 405, 415, 422, 501])
def test_a_refused_batch_is_read_by_separate_requests_and_remembered(rsps, caplog, status):
    rsps.post(BASE, status=status, json={"resourceType": "OperationOutcome",
                                         "issue": [{"severity": "error", "code": "not-supported"}]})
    rsps.get(f"{BASE}/Patient/secret-patient", json={**PATIENT, "id": "secret-patient"})
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1")))
    server = source()
    with caplog.at_level(logging.WARNING, logger="fhir_ai.fhir.sources"):
        assert ids(server.record("secret-patient", [HR])) == ["Patient/secret-patient", "Encounter/enc-1",
                                                              "Observation/o1"]
        assert [m for m, _ in sent(rsps)] == ["POST", "GET", "GET", "POST"]
        rsps.calls.reset()
        server.record("secret-patient", [HR])
    assert sent(rsps) == [("GET", "/r4/Patient/secret-patient"), ("GET", "/r4/Encounter"),
                          ("POST", "/r4/Observation/_search")]          # no batch again
    assert server.batch is False
    [said] = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
    assert f"HTTP {status}" in said and "secret-patient" not in said


@pytest.mark.parametrize("answer", [
    {"resourceType": "Bundle", "type": "batch-response", "entry": [entry(PATIENT)]},       # too few entries
    {"resourceType": "Bundle", "type": "transaction-response", "entry": WHOLE["entry"]},
    {"resourceType": "Bundle", "type": "searchset", "entry": WHOLE["entry"]},
    {"resourceType": "OperationOutcome", "issue": []},
    {"resourceType": "Bundle", "type": "batch-response", "entry": [PATIENT, "x", None]},
    [1, 2, 3],
])
def test_an_answer_that_is_not_a_batch_response_counts_as_refused(rsps, answer):
    rsps.post(BASE, json=answer)
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1")))
    server = source()
    assert ids(server.record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1"]
    assert server.batch is False


def separate_requests_work(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1")))


SEPARATE = [("GET", "/r4/Patient/pat-1"), ("GET", "/r4/Encounter"), ("POST", "/r4/Observation/_search")]


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 503}, {"status": 429}, {"status": 504},
                                   {"body": requests.ReadTimeout("slow")},
                                   {"body": requests.ConnectionError("reset")},
                                   {"status": 200, "body": ""},                       # an empty answer
                                   {"status": 200, "body": '{"resourceType": "Bundle", "ty'}])   # cut short
def test_a_failing_batch_is_sent_once_then_read_separately(rsps, caplog, monkeypatch, fault):
    """A batch that fails is not retried: the separate requests (with their retries) read the record. Three
    failures in a row, each followed by separate requests that worked, pause batching; it is tried again later."""
    clock = [1000.0]
    rsps.post(BASE, **fault)
    separate_requests_work(rsps)
    server = source(retries=3)
    server._clock = lambda: clock[0]
    with caplog.at_level(logging.INFO):
        for attempt in range(1, 4):
            rsps.calls.reset()
            assert ids(server.record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1"]
            assert sent(rsps) == [("POST", "/r4"), *SEPARATE]              # one try, then the separate requests
            assert server.batch is (attempt < 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "batch" in r.getMessage()]
    assert len(warnings) == 1 and "3 batches in a row" in warnings[0]
    # the client's giving up on a batch is no error: the separate requests come next, and they worked
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    rsps.calls.reset()
    clock[0] += BATCH_OFF_FOR - 1
    server.record("pat-1", [HR])
    assert sent(rsps) == SEPARATE                                          # paused
    rsps.calls.reset()
    clock[0] += 2
    rsps.replace(responses.POST, BASE, json=WHOLE)
    assert len(server.record("pat-1", [HR])) == 4
    assert sent(rsps) == [("POST", "/r4")] and server.batch is True       # tried again, and it works


def test_a_success_between_failures_starts_the_count_again(rsps):
    separate_requests_work(rsps)
    rsps.post(BASE, status=503)
    server = source()
    for answer in ({"status": 503}, {"status": 503}, {"json": WHOLE}, {"status": 503}, {"status": 503}):
        rsps.replace(responses.POST, BASE, **answer)
        server.record("pat-1", [HR])
    assert server.batch is True


def test_an_outage_costs_one_extra_attempt_for_three_assessments_then_none(rsps):
    """The server is down: the separate requests' error is reported, as without a batch; a failed batch is the
    server's trouble whatever the separate requests do, so after three batching pauses and an outage costs
    what it cost before batches."""
    rsps.post(BASE, status=503)
    rsps.get(f"{BASE}/Patient/pat-1", status=503)
    server = source(retries=2)
    for attempt in range(1, 5):
        rsps.calls.reset()
        with pytest.raises(UpstreamError, match=r"GET /r4/Patient/pat-1.*after 3 attempt") as raised:
            server.record("pat-1", [HR])
        assert raised.value.temporary and raised.value.upstream_status == 503
        batch = [("POST", "/r4")] if attempt <= 3 else []
        assert sent(rsps) == batch + [("GET", "/r4/Patient/pat-1")] * 3
    assert server.batch is False


def test_retry_after_on_a_failed_batch_is_waited_for_before_the_separate_requests(rsps):
    rsps.post(BASE, status=429, headers={"Retry-After": "7"})
    separate_requests_work(rsps)
    waits: list[float] = []
    server = ServerSource(FhirClient(BASE, retries=3, sleep=waits.append, retry_after_cap=5), batch=True, check=False)
    assert len(server.record("pat-1", [HR])) == 3
    assert waits == [5] and sent(rsps) == [("POST", "/r4"), *SEPARATE]     # capped at retry_after_cap


def test_refused_credentials_are_the_separate_requests_error(rsps):
    rsps.post(BASE, status=401)
    rsps.get(f"{BASE}/Patient/pat-1", status=401)
    server = source()
    with pytest.raises(UpstreamError, match="GET /r4/Patient/pat-1.*refused our credentials") as raised:
        server.record("pat-1", [HR])
    assert raised.value.upstream_status == 401 and server.batch is True


def test_a_gateway_refusing_only_the_batch_pauses_it(rsps):
    rsps.post(BASE, status=401)
    separate_requests_work(rsps)
    server = source()
    assert len(server.record("pat-1", [HR])) == 3
    assert server.batch is False


def test_an_unknown_patient_refused_with_the_whole_batch_teaches_nothing(rsps):
    """Some servers answer a whole batch 404 when one entry fails: the read says 404 too, so the batch is kept."""
    rsps.post(BASE, status=404, json=NOT_FOUND)
    rsps.get(f"{BASE}/Patient/pat-1", status=404, json=NOT_FOUND)
    server = source()
    with pytest.raises(UpstreamNotFound):
        server.record("pat-1", [HR])
    assert server.batch is True


def test_codes_in_a_batch_url_are_percent_encoded_as_a_uri(rsps):
    """request.url is a URI, not a form: a space is %20 (a '+' there would be a plus), '|' ',' '$' escaped."""
    rsps.post(BASE, json=WHOLE)
    source().record("pat-1", [("urn:local", "heart rate"), ("urn:local", "a+b"), ("urn:local", "a,b|c$")])
    url = json.loads(rsps.calls[0].request.body)["entry"][2]["request"]["url"]
    code = url.split("&code=", 1)[1]
    assert code == "urn:local%7Cheart%20rate,urn:local%7Ca%2Bb,urn:local%7Ca%5C,b%5C%7Cc%5C%24"
    # read as a URI (percent-decoded, '+' kept): the FHIR-escaped tokens the GET and POST forms send
    assert unquote(code) == r"urn:local|heart rate,urn:local|a+b,urn:local|a\,b\|c\$"


# -- auto: the CapabilityStatement decides -------------------------------------------------------

def test_auto_batches_where_the_capability_statement_lists_batch(rsps):
    rsps.get(f"{BASE}/metadata", json=CAPABILITIES)
    rsps.post(BASE, json=WHOLE)
    server = source(batch=None)
    server.record("pat-1", [HR])
    server.record("pat-1", [HR])
    assert sent(rsps) == [("GET", "/r4/metadata"), ("POST", "/r4"), ("POST", "/r4")]   # asked once
    assert server.batch is True


def test_auto_without_batch_in_the_capability_statement_reads_separately(rsps):
    rsps.get(f"{BASE}/metadata", json=NO_BATCH)
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1")))
    server = source(batch=None)
    server.record("pat-1", [HR])
    server.record("pat-1", [HR])
    assert [m for m, _ in sent(rsps)] == ["GET"] + ["GET", "GET", "POST"] * 2
    assert server.batch is False


def test_auto_asks_again_later_when_the_capability_statement_cannot_be_read(rsps, monkeypatch):
    clock = [1000.0]
    rsps.get(f"{BASE}/metadata", status=503)
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1")))
    server = source(batch=None, retries=3)
    server._clock = lambda: clock[0]
    assert len(server.record("pat-1", [HR])) == 3
    assert sent(rsps)[0] == ("GET", "/r4/metadata") and len(sent(rsps)) == 4     # one try, no retries
    rsps.calls.reset()
    clock[0] += BATCH_PROBE_RETRY - 1
    server.record("pat-1", [HR])
    assert ("GET", "/r4/metadata") not in sent(rsps) and server.batch is None
    rsps.calls.reset()
    clock[0] += 2
    rsps.replace(responses.GET, f"{BASE}/metadata", json=CAPABILITIES)
    rsps.post(BASE, json=WHOLE)
    server.record("pat-1", [HR])
    assert sent(rsps) == [("GET", "/r4/metadata"), ("POST", "/r4")]
    assert server.batch is True


@pytest.mark.parametrize("statement, expected", [
    (CAPABILITIES, True),
    (NO_BATCH, False),
    ({**CAPABILITIES, "rest": [{"mode": "client", "interaction": [{"code": "batch"}]}]}, False),
    ({**CAPABILITIES, "rest": [{"mode": "server"}, {"mode": "server", "interaction": [{"code": "batch"}]}]}, True),
    ({**CAPABILITIES, "rest": [{"mode": "server", "interaction": "batch"}]}, False),
    ({**CAPABILITIES, "rest": [{"mode": "server", "interaction": [None, "batch", {"code": ["batch"]}]}]}, False),
    ({**CAPABILITIES, "rest": {"mode": "server"}}, False),
    ({**CAPABILITIES, "resourceType": "Bundle"}, False),
    ([], False),
])
def test_declares_batch(statement, expected):
    assert declares_batch(statement) is expected


def test_unsafe_ids_are_refused_before_anything_is_sent(rsps):
    with pytest.raises(Exception, match="not a FHIR id"):
        source().record("a/b", [HR])
    with pytest.raises(ValueError, match="time-zone aware"):
        source().record("pat-1", [HR], since=datetime(2024, 5, 5))
    assert not rsps.calls


def test_an_id_of_dots_is_not_put_in_a_batch_url(rsps):
    """'..' is a path segment: [base]/Patient/.. would be read as the server base. Refused, nothing sent
    (neither in a batch entry's url nor as a request of its own)."""
    with pytest.raises(BadRequest, match="not dots only") as caught:      # the source refuses the id itself
        source().record("..", [HR])
    assert caught.value.expression == ["patient"]
    # and the client refuses such a segment in any path it is given (another caller, another resource type)
    with pytest.raises(BadRequest, match="path segment"):
        source().client.get("Group/..")
    assert sent(rsps) == []


# -- the setting -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, mode", [("auto", None), ("AUTO", None), ("true", True), ("on", True),
                                         ("false", False), ("0", False), (True, True), (False, False)])
def test_source_batch_setting(value, mode, rsps):
    settings = load_settings({"source_batch": value}, environ={})
    assert settings.source_batch_mode is mode
    made = make_source(BASE, batch=settings.source_batch_mode)
    assert isinstance(made, ServerSource) and made.batch is mode


def test_source_batch_default_is_auto():
    assert load_settings(environ={}).source_batch_mode is None
    assert load_settings(environ={"FHIR_AI_SOURCE_BATCH": "false"}).source_batch_mode is False


def test_a_bad_source_batch_setting_stops_the_start(monkeypatch):
    with pytest.raises(ConfigurationError, match="SOURCE_BATCH.*'sometimes'") as raised:
        load_settings({"source_batch": "sometimes"}, environ={})
    assert raised.value.expression == "source_batch" or "source_batch" in str(raised.value.expression)


def test_one_thread_asks_for_the_capability_statement_the_others_read_separately(rsps):
    """Gunicorn threads starting together: one probe, not one per request; nobody waits for it."""
    import threading
    release, asked = threading.Event(), threading.Event()

    def capabilities(request):
        asked.set()
        release.wait(5)
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(CAPABILITIES)
    rsps.add_callback(responses.GET, f"{BASE}/metadata", callback=capabilities)
    separate_requests_work(rsps)
    rsps.post(BASE, json=WHOLE)
    server = source(batch=None)
    failures: list[BaseException] = []

    def first_request() -> None:
        try:
            server.record("pat-1", [HR])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)
    first = threading.Thread(target=first_request)
    first.start()
    assert asked.wait(5)
    others = [server.record("pat-1", [HR]) for _ in range(3)]          # while the probe is out
    during = sent(rsps)
    release.set()
    first.join(10)
    assert not first.is_alive() and not failures
    assert all(len(record) == 3 for record in others)
    assert during == SEPARATE * 3             # no second probe, no waiting, no batch (the probe is still out)
    assert server.batch is True
    rsps.calls.reset()
    assert len(server.record("pat-1", [HR])) == 4 and sent(rsps) == [("POST", "/r4")]


@pytest.mark.parametrize("status", [401, 403, 404, 400])
def test_a_capability_statement_refused_means_no_batch_for_an_hour(rsps, monkeypatch, status):
    clock = [1000.0]
    rsps.get(f"{BASE}/metadata", status=status)
    separate_requests_work(rsps)
    server = source(batch=None)
    server._clock = lambda: clock[0]
    server.record("pat-1", [HR])
    server.record("pat-1", [HR])
    assert [path for _, path in sent(rsps)].count("/r4/metadata") == 1 and server.batch is False
    clock[0] += BATCH_OFF_FOR + 1
    rsps.replace(responses.GET, f"{BASE}/metadata", json=CAPABILITIES)
    rsps.post(BASE, json=WHOLE)
    assert len(server.record("pat-1", [HR])) == 4 and server.batch is True     # asked again, an hour on


def test_after_a_pause_auto_asks_the_capability_statement_again(rsps):
    """auto: a pause ends in a new probe, not in batching regardless of what the server now says."""
    clock = [1000.0]
    rsps.get(f"{BASE}/metadata", json=CAPABILITIES)
    rsps.post(BASE, status=405)
    separate_requests_work(rsps)
    server = source(batch=None)
    server._clock = lambda: clock[0]
    server.record("pat-1", [HR])
    assert server.batch is False
    clock[0] += BATCH_OFF_FOR + 1
    rsps.replace(responses.GET, f"{BASE}/metadata", json=NO_BATCH)
    rsps.calls.reset()
    server.record("pat-1", [HR])
    assert sent(rsps) == [("GET", "/r4/metadata"), *SEPARATE] and server.batch is False


def test_true_resumes_batching_after_a_pause_without_a_probe(rsps):
    clock = [1000.0]
    rsps.post(BASE, status=405)
    separate_requests_work(rsps)
    server = source(batch=True)
    server._clock = lambda: clock[0]
    server.record("pat-1", [HR])
    clock[0] += BATCH_OFF_FOR + 1
    rsps.replace(responses.POST, BASE, json=WHOLE)
    rsps.calls.reset()
    assert len(server.record("pat-1", [HR])) == 4 and sent(rsps) == [("POST", "/r4")]


def test_concurrent_refusals_pause_once(rsps, caplog):
    import threading
    gate = threading.Barrier(4)

    def refused(request):
        gate.wait(5)
        return 405, {}, ""
    rsps.add_callback(responses.POST, BASE, callback=refused)
    separate_requests_work(rsps)
    server = source()
    with caplog.at_level(logging.WARNING, logger="fhir_ai.fhir.sources"):
        threads = [threading.Thread(target=server.record, args=("pat-1", [HR])) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert len([r for r in caplog.records if "batch" in r.getMessage()]) == 1 and server.batch is False


# -- checking the first batch answers against the separate requests ---------------------------------

def test_the_first_batch_answer_is_checked_then_batches_are_used_alone(rsps, caplog):
    """A server that takes batches may still misread their entries; the first answer is read both ways, the
    separate requests' record is the one used, and once both agree batches are used alone."""
    rsps.post(BASE, json=WHOLE)
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1"), obs("o2")))
    server = source(check=True)
    assert not server.batch_checked
    with caplog.at_level(logging.INFO, logger="fhir_ai.fhir.sources"):
        assert ids(server.record("pat-1", [HR]))[2:] == ["Observation/o1", "Observation/o2"]
    assert sent(rsps) == [("POST", "/r4"), *SEPARATE]
    assert server.batch_checked and "answered as the separate requests did" in caplog.text
    rsps.calls.reset()
    assert ids(server.record("pat-1", [HR]))[2:] == ["Observation/o1", "Observation/o2"]
    assert sent(rsps) == [("POST", "/r4")]


def test_a_record_without_data_tells_nothing_and_the_next_one_is_checked(rsps):
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset(ENCOUNTER)), entry(searchset())))
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset())
    server = source(check=True)
    for _ in range(3):
        rsps.calls.reset()
        server.record("pat-1", [HR])
        assert sent(rsps) == [("POST", "/r4"), *SEPARATE] and not server.batch_checked
    assert server.batch is True


def test_batches_answered_with_empty_searchsets_are_caught_and_batching_pauses(rsps, caplog):
    """The silent failure: a server that answers every batch search with an empty searchset (a patient
    without data: no risk found). Each checked answer uses the separate requests' record; two in a row
    unlike it pause batching, logged once."""
    clock = [1000.0]
    rsps.post(BASE, json=batch_response(entry(PATIENT), entry(searchset()), entry(searchset())))
    separate_requests_work(rsps)
    server = source(check=True)
    server._clock = lambda: clock[0]
    with caplog.at_level(logging.INFO, logger="fhir_ai.fhir.sources"):
        for _ in range(2):
            assert ids(server.record("pat-1", [HR])) == ["Patient/pat-1", "Encounter/enc-1", "Observation/o1"]
        assert server.batch is False
        rsps.calls.reset()
        server.record("pat-1", [HR])
        assert sent(rsps) == SEPARATE                         # paused: no batch for an hour
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 answers in a row unlike the separate requests'" in warnings[0]
    assert "pat-1" not in caplog.text
    clock[0] += BATCH_OFF_FOR + 1                             # after the pause: tried, and checked, again
    rsps.calls.reset()
    server.record("pat-1", [HR])
    assert sent(rsps) == [("POST", "/r4"), *SEPARATE]


def test_one_differing_answer_may_be_data_that_changed_and_pauses_nothing(rsps):
    rsps.post(BASE, json=WHOLE)                                # o1, o2
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    separate = rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1"), obs("o2"), obs("o3")))
    server = source(check=True)
    assert ids(server.record("pat-1", [HR]))[2:] == ["Observation/o1", "Observation/o2", "Observation/o3"]
    assert server.batch is True and not server.batch_checked
    rsps.replace(responses.POST, f"{BASE}/Observation/_search", json=searchset(obs("o1"), obs("o2")))
    server.record("pat-1", [HR])
    assert server.batch is True and server.batch_checked and separate.call_count == 1


def test_each_probe_that_finds_batch_checks_again(rsps):
    """auto: the CapabilityStatement is asked again hourly; the server behind it may have changed."""
    clock = [1000.0]
    rsps.get(f"{BASE}/metadata", json=CAPABILITIES)
    rsps.post(BASE, json=WHOLE)
    rsps.get(f"{BASE}/Patient/pat-1", json=PATIENT)
    rsps.get(f"{BASE}/Encounter", json=searchset(ENCOUNTER))
    rsps.post(f"{BASE}/Observation/_search", json=searchset(obs("o1"), obs("o2")))
    server = ServerSource(FhirClient(BASE, retries=0, sleep=lambda seconds: None), batch=None)   # check: default
    server._clock = lambda: clock[0]
    server.record("pat-1", [HR])
    assert server.batch_checked
    clock[0] += BATCH_OFF_FOR + 1
    rsps.calls.reset()
    server.record("pat-1", [HR])
    assert sent(rsps) == [("GET", "/r4/metadata"), ("POST", "/r4"), *SEPARATE]
