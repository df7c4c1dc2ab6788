"""The two data sources (server, folder) and the FHIR time helpers they share."""
from __future__ import annotations

import gzip
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from responses import matchers

from fhir_ai.errors import BadRequest, ConfigurationError, NotSupported, UpstreamError, UpstreamNotFound
from fhir_ai.fhir import FolderSource, ServerSource, make_source
from fhir_ai.fhir.client import FhirClient, SearchPostRefused
from fhir_ai.fhir.sources import MAX_URL, code_token
from fhir_ai.fhir.times import (datetime_range, effective_time, format_datetime, parse_datetime,
                                to_epoch)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "fhir"
BASE = "https://fhir.hospital.example/r4"
LOINC = "http://loinc.org"
HR, RR, SPO2_ART, TEMP = ((LOINC, "8867-4"), (LOINC, "9279-1"), (LOINC, "2708-6"),
                          (LOINC, "8310-5"))
UTC = timezone.utc


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# -- times ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("2024", utc(2024, 1, 1)),
    ("2024-05", utc(2024, 5, 1)),
    ("2024-05-06", utc(2024, 5, 6)),
    ("2024-05-06T09:30:00+09:00", utc(2024, 5, 6, 0, 30)),
    ("2024-05-06T00:30:00Z", utc(2024, 5, 6, 0, 30)),
    ("2024-05-05T20:30:00-04:00", utc(2024, 5, 6, 0, 30)),
    ("2024-05-06T00:30:00.25Z", utc(2024, 5, 6, 0, 30, 0, 250000)),
    ("2024-05-06T00:30:00.123456789Z", utc(2024, 5, 6, 0, 30, 0, 123456)),
    ("2016-12-31T23:59:60Z", utc(2016, 12, 31, 23, 59, 59)),  # leap second
])
def test_parse_datetime(text, expected):
    parsed = parse_datetime(text)
    assert parsed == expected
    assert parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["2024-05-06T09:30:00", "yesterday", "2024-13", "", "2024-05-06T"])
def test_parse_datetime_rejects(text):
    with pytest.raises(ValueError):
        parse_datetime(text)


def test_datetime_range_of_partial_dates():
    assert datetime_range("2024") == (utc(2024, 1, 1), utc(2024, 12, 31, 23, 59, 59, 999999))
    assert datetime_range("2024-12") == (utc(2024, 12, 1), utc(2024, 12, 31, 23, 59, 59, 999999))
    assert datetime_range("2024-02")[1] == utc(2024, 2, 29, 23, 59, 59, 999999)
    assert datetime_range("2024-05-06") == (utc(2024, 5, 6), utc(2024, 5, 6, 23, 59, 59, 999999))
    point = utc(2024, 5, 6, 0, 30)
    assert datetime_range("2024-05-06T09:30:00+09:00") == (point, point)


def test_to_epoch_and_format_round_trip():
    assert to_epoch("1970-01-01T09:00:00+09:00") == 0.0
    assert to_epoch("2024-05-06T00:30:00Z") == to_epoch("2024-05-06T09:30:00+09:00")
    tokyo = parse_datetime("2024-05-06T09:30:00.5+09:00").astimezone(
        timezone(timedelta(hours=9)))
    assert format_datetime(tokyo) == "2024-05-06T00:30:00.5Z"
    assert format_datetime(utc(2024, 5, 6)) == "2024-05-06T00:00:00Z"
    with pytest.raises(ValueError):
        format_datetime(datetime(2024, 5, 6))


def test_effective_time_preference():
    both = {"effectiveDateTime": "2024-05-06", "issued": "2024-05-07"}
    assert effective_time(both) == "2024-05-06"
    assert effective_time({"effectiveInstant": "2024-05-06T00:00:00Z"}) == "2024-05-06T00:00:00Z"
    assert effective_time({"effectivePeriod": {"start": "a", "end": "b"}}) == "b"
    assert effective_time({"effectivePeriod": {"start": "a"}}) == "a"
    assert effective_time({"issued": "2024-05-07T00:00:00Z"}) == "2024-05-07T00:00:00Z"
    assert effective_time({}) is None


# -- folder source ------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The fixture folder, with one Observation file gzipped and an unrelated type added."""
    src = FIXTURES / "folder"
    for name in ("Patient.ndjson", "Encounter.ndjson", "Observation.000.ndjson",
                 "bundle-pat-b.json"):
        shutil.copy(src / name, tmp_path / name)
    with gzip.open(tmp_path / "Observation.001.ndjson.gz", "wb") as out:
        out.write((src / "Observation.001.ndjson").read_bytes())
    # Bulk-Data files of other types are not even opened: this one is not JSON at all.
    (tmp_path / "Condition.000.ndjson").write_text("not json\n")
    (tmp_path / "manifest.json").write_text(json.dumps({"transactionTime": "2024-05-07T00:00:00Z",
                                                        "output": []}))
    return tmp_path


def ids(resources) -> list[str]:
    return sorted(r["id"] for r in resources)


def test_folder_patient_and_encounters(folder):
    source = make_source(str(folder))
    assert isinstance(source, FolderSource) and source.read_only
    assert source.patient("pat-a")["birthDate"] == "1950-03-01"
    assert ids(source.encounters("pat-a")) == ["enc-a1", "enc-a2"]
    assert source.patient_ids() == ["pat-a", "pat-b"]


def test_folder_all_observations_across_split_and_gzip_files(folder):
    source = FolderSource(folder)
    assert ids(source.observations("pat-a")) == [
        "obs-glucose", "obs-hr-1", "obs-hr-2", "obs-hr-3", "obs-hr-url", "obs-rr-1", "obs-spo2",
        "obs-temp"]  # obs-hr-2 is in two files but counted once


def test_folder_bundle_with_urn_uuid_references(folder):
    source = FolderSource(folder)
    assert source.patient("pat-b")["gender"] == "male"
    assert ids(source.encounters("pat-b")) == ["enc-b1"]
    assert ids(source.observations("pat-b")) == ["obs-b-hr"]


def test_folder_code_filter_matches_any_coding(folder):
    source = FolderSource(folder)
    assert ids(source.observations("pat-a", codes=[HR])) == [
        "obs-hr-1", "obs-hr-2", "obs-hr-3", "obs-hr-url"]
    # obs-spo2's second coding is 2708-6
    assert ids(source.observations("pat-a", codes=[SPO2_ART, RR])) == ["obs-rr-1", "obs-spo2"]
    assert source.observations("pat-a", codes=[("http://snomed.info/sct", "8867-4")]) == []
    assert ids(source.observations("pat-a", codes=[("", "9279-1")])) == ["obs-rr-1"]
    assert source.observations("pat-a", codes=[]) == []


def test_folder_date_filter_compares_time_zones(folder):
    source = FolderSource(folder)
    # obs-hr-1 is 09:30+09:00 = 00:30Z: textually later than obs-hr-2's 01:00Z, in fact earlier.
    since = utc(2024, 5, 6, 0, 45)
    assert ids(source.observations("pat-a", codes=[HR], since=since)) == [
        "obs-hr-2", "obs-hr-3", "obs-hr-url"]
    assert ids(source.observations("pat-a", codes=[HR], until=since)) == ["obs-hr-1"]
    tokyo = timezone(timedelta(hours=9))
    until = datetime(2024, 5, 6, 10, 0, tzinfo=tokyo)  # = 01:00Z, inclusive
    assert ids(source.observations("pat-a", codes=[HR], since=since, until=until)) == ["obs-hr-2"]


def test_folder_date_filter_uses_ranges_like_a_server(folder):
    source = FolderSource(folder)
    # obs-temp is '2024-05' (all of May); obs-spo2 is a Period 00:50Z-01:05Z; obs-glucose has
    # only 'issued', which the 'date' search parameter does not look at.
    late_may = utc(2024, 5, 31, 12)
    assert ids(source.observations("pat-a", since=late_may)) == ["obs-temp"]
    assert ids(source.observations("pat-a", since=utc(2024, 6, 1))) == []
    window = dict(since=utc(2024, 5, 6, 1, 2), until=utc(2024, 5, 6, 1, 3))
    assert ids(source.observations("pat-a", **window)) == ["obs-spo2", "obs-temp"]
    with pytest.raises(ValueError):
        source.observations("pat-a", since=datetime(2024, 5, 6))


def test_folder_unknown_patient_and_bad_id(folder):
    source = FolderSource(folder)
    with pytest.raises(UpstreamNotFound) as err:
        source.patient("nobody")
    assert err.value.status == 404
    assert source.observations("nobody") == []  # as a server's empty search
    with pytest.raises(BadRequest):
        source.patient("../etc/passwd")


def test_folder_is_read_only(folder):
    with pytest.raises(NotSupported, match="read-only"):
        FolderSource(folder).write({"resourceType": "RiskAssessment", "id": "x"})


def test_folder_malformed_line_names_file_and_line(folder):
    with open(folder / "Observation.000.ndjson", "a") as out:
        out.write('{"resourceType": "Observation", "id": "broken",\n')
    source = FolderSource(folder)
    with pytest.raises(ConfigurationError) as err:
        source.patient("pat-a")
    assert "Observation.000.ndjson, line 8" in err.value.message


def test_make_source_rejects_missing_folder(tmp_path):
    with pytest.raises(ConfigurationError, match="neither an http"):
        make_source(str(tmp_path / "missing"))


# -- server source ------------------------------------------------------------------------------

@pytest.fixture
def server():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        source = make_source(BASE, token="tok", retries=0)
        assert isinstance(source, ServerSource) and not source.read_only
        yield source, rsps
        source.close()


@pytest.fixture
def get_server(server):
    """A server source whose server refused POST _search before: it searches by GET."""
    source, rsps = server
    source.search_by_post = False
    return source, rsps


@pytest.fixture
def sleeps_source():
    """A server source that retries (back-offs recorded, not slept)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        source = ServerSource(FhirClient(BASE, retries=2, sleep=lambda seconds: None))
        yield source, rsps
        source.close()


def bundle(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def obs(oid: str) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
            "subject": {"reference": "Patient/example"}}


def test_server_patient_and_not_found(server):
    source, rsps = server
    rsps.get(f"{BASE}/Patient/example",
             json=json.loads((FIXTURES / "patient-example.json").read_text()))
    rsps.get(f"{BASE}/Patient/unknown", status=404,
             json=json.loads((FIXTURES / "operationoutcome-not-found.json").read_text()))
    assert source.patient("example")["id"] == "example"
    with pytest.raises(UpstreamNotFound, match="is not known"):
        source.patient("unknown")


def test_server_encounters_query(server):
    source, rsps = server
    enc = json.loads((FIXTURES / "encounter-example.json").read_text())
    rsps.get(f"{BASE}/Encounter", json=bundle(enc),
             match=[matchers.query_param_matcher({"patient": "example", "_count": "100"})])
    assert ids(source.encounters("example")) == ["enc-1"]


def test_server_observation_query_with_codes_and_dates(get_server):
    source, rsps = get_server
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    since, until = utc(2024, 5, 6), datetime.fromisoformat("2024-05-06T18:00:00+09:00")
    assert ids(source.observations("example", codes=[HR, ("", "x,y")], since=since,
                                   until=until)) == ["o1"]
    query = parse_qs(urlsplit(rsps.calls[0].request.url).query)
    assert query["patient"] == ["example"]
    assert query["code"] == ["http://loinc.org|8867-4,x\\,y"]
    assert query["date"] == ["ge2024-05-06T00:00:00Z", "le2024-05-06T09:00:00Z"]
    assert query["_count"] == ["200"]


def test_server_long_code_lists_are_split_and_deduplicated(get_server):
    source, rsps = get_server
    codes = [(LOINC, f"{10000 + i}-{i % 10}") for i in range(150)]
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1"), obs("o2")))  # every search: same two
    assert ids(source.observations("example", codes=codes)) == ["o1", "o2"]
    assert len(rsps.calls) > 1
    sent = []
    for call in rsps.calls:
        assert len(call.request.url) <= MAX_URL
        sent.extend(parse_qs(urlsplit(call.request.url).query)["code"][0].split(","))
    assert sent == [code_token(s, c) for s, c in codes]


def test_server_write_is_put_by_id(server):
    source, rsps = server
    ra = {"resourceType": "RiskAssessment", "id": "ra-1", "status": "final"}
    put = rsps.put(f"{BASE}/RiskAssessment/ra-1", json=ra)
    assert source.write(ra) == ra
    assert put.call_count == 1
    assert rsps.calls[0].request.headers["Authorization"] == "Bearer tok"


def test_server_rejects_unsafe_patient_id(server):
    source, rsps = server
    with pytest.raises(BadRequest):
        source.observations("example/../../Patient")
    assert len(rsps.calls) == 0


def test_server_observation_query_is_sent_compact(get_server):
    """':', '/' and ',' go out as they are (FHIR's own form), '|' and the escaping backslash escaped."""
    source, rsps = get_server
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    source.observations("example", codes=[HR, ("", "x,y")], since=utc(2024, 5, 6))
    assert rsps.calls[0].request.url == (f"{BASE}/Observation?patient=example&date=ge2024-05-06T00:00:00Z"
                                         "&_count=200&code=http://loinc.org%7C8867-4,x%5C,y")


def test_server_code_chunks_are_filled_up_to_max_url(get_server):
    """Each split search but the last would pass MAX_URL with the next code: no more searches than needed."""
    source, rsps = get_server
    codes = [(LOINC, f"{10000 + i}-{i % 10}") for i in range(150)]
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    for patient in ("example", "a-much-longer-patient-id-0123456789"):   # another room, another split
        rsps.calls.reset()
        source.observations(patient, codes=codes, until=utc(2024, 5, 6))
        urls = [call.request.url for call in rsps.calls]
        assert len(urls) > 1 and all(len(url) <= MAX_URL for url in urls)
        for url, following in zip(urls, urls[1:]):
            first = urlsplit(following).query.split("&code=", 1)[1].split(",", 1)[0]
            assert len(url) + len(",") + len(first) > MAX_URL
        sent = [code for url in urls for code in parse_qs(urlsplit(url).query)["code"][0].split(",")]
        assert sent == [code_token(s, c) for s, c in codes]


# -- search by POST _search, and the GET it falls back to -------------------------------------

SEARCH = f"{BASE}/Observation/_search"
CODES_150 = [(LOINC, f"{10000 + i}-{i % 10}") for i in range(150)]


def form_of(request) -> dict[str, list[str]]:
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    return parse_qs(request.body.decode("ascii"))


def test_server_code_search_is_one_post_with_every_code_in_the_form(server):
    source, rsps = server
    rsps.post(SEARCH, json=bundle(obs("o1"), obs("o2"), obs("o1")))     # a repeat is dropped as before
    since, until = utc(2024, 5, 6), datetime.fromisoformat("2024-05-06T18:00:00+09:00")
    assert ids(source.observations("example", codes=[*CODES_150, ("", "x,y")], since=since,
                                   until=until)) == ["o1", "o2"]
    [call] = rsps.calls                                   # however many codes: one request
    assert call.request.method == "POST" and call.request.url == SEARCH   # nothing in the URL
    assert call.request.headers["Authorization"] == "Bearer tok"
    form = form_of(call.request)
    assert form["patient"] == ["example"]
    assert form["code"] == [",".join([*(code_token(s, c) for s, c in CODES_150), "x\\,y"])]
    assert form["date"] == ["ge2024-05-06T00:00:00Z", "le2024-05-06T09:00:00Z"]
    assert form["_count"] == ["200"]
    assert source.search_by_post


def test_server_post_search_pages_by_get_next_links(server):
    source, rsps = server
    first = bundle(obs("o1"))
    first["link"] = [{"relation": "next", "url": f"{BASE}/Observation?_getpages=t&_page=1"}]
    rsps.post(SEARCH, json=first)
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o2")),
             match=[matchers.query_param_matcher({"_getpages": "t", "_page": "1"})])
    assert ids(source.observations("example", codes=[HR])) == ["o1", "o2"]
    assert [c.request.method for c in rsps.calls] == ["POST", "GET"]


def matching(request, observations: list[dict]) -> tuple[int, dict, str]:
    """A server's search: the Observations with any of the 'code' values, by GET or POST _search."""
    text = urlsplit(request.url).query
    if request.method == "POST":
        text = "&".join(q for q in (text, request.body.decode("ascii")) if q)
    wanted = set(parse_qs(text)["code"][0].split(","))
    found = [o for o in observations if code_token(*(lambda c: (c["system"], c["code"]))(o["code"]["coding"][0])) in wanted]
    return 200, {"Content-Type": "application/fhir+json"}, json.dumps(bundle(*found))


def test_server_post_and_get_searches_find_the_same_observations(server):
    """150 codes: one POST, or (server refusing POST) several GETs split by MAX_URL: the same resources."""
    source, rsps = server
    observations = [{**obs(f"o{i}"), "code": {"coding": [{"system": LOINC, "code": c}]}}
                    for i, (_, c) in enumerate(CODES_150[::7] + [(LOINC, "not-asked")])]
    answer = lambda request: matching(request, observations)  # noqa: E731
    rsps.add_callback(responses.POST, SEARCH, answer)
    rsps.add_callback(responses.GET, f"{BASE}/Observation", answer)
    by_post = source.observations("example", codes=CODES_150)
    source.search_by_post = False
    by_get = source.observations("example", codes=CODES_150)
    assert [c.request.method for c in rsps.calls][0] == "POST" and len(rsps.calls) > 2
    assert by_post == by_get and ids(by_post) == ids(observations[:-1])


REFUSALS = [
    (405, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported"}]}),
    (404, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found",
                                                          "diagnostics": "Observation/_search is not known"}]}),
    (501, None),
    (415, None),
    (400, {"resourceType": "OperationOutcome",
           "issue": [{"severity": "error", "code": "not-supported", "diagnostics": "POST search is not supported"}]}),
]


@pytest.mark.parametrize("status, body", REFUSALS)
def test_server_refusing_post_search_is_searched_by_get_and_remembered(server, caplog, status, body):
    source, rsps = server
    rsps.post(SEARCH, status=status, json=body)
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    with caplog.at_level("WARNING", logger="fhir_ai.fhir.sources"):
        assert ids(source.observations("secret-patient", codes=CODES_150)) == ["o1"]
        methods = [c.request.method for c in rsps.calls]
        assert methods[0] == "POST" and set(methods[1:]) == {"GET"} and len(methods) > 2   # split as before
        rsps.calls.reset()
        assert ids(source.observations("secret-patient", codes=[HR])) == ["o1"]
        assert [c.request.method for c in rsps.calls] == ["GET"]          # remembered: no POST again
    assert not source.search_by_post
    [record] = [r for r in caplog.records if "POST" in r.getMessage()]      # said once
    assert f"HTTP {status}" in record.getMessage() and "secret-patient" not in record.getMessage()


@pytest.mark.parametrize("status, body", [
    (400, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid",
                                                          "diagnostics": "unknown parameter"}]}),
    (400, {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "code": "not-supported"}]}),
    (400, None),
    (403, None),
    (422, None),
    (500, None),
    (503, None),
    (429, None),
])
def test_server_post_search_errors_are_errors_not_a_refusal(server, status, body):
    """Anything but a refusal is the error it would be for a GET (5xx and 429 retried as ever: retries=0
    here), and no GET is tried."""
    source, rsps = server
    rsps.post(SEARCH, status=status, json=body)
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    with pytest.raises(UpstreamError) as raised:
        source.observations("example", codes=[HR])
    assert not isinstance(raised.value, SearchPostRefused)
    assert raised.value.upstream_status == status
    assert raised.value.temporary == (status in (429, 500, 503))
    assert [c.request.method for c in rsps.calls] == ["POST"]
    assert source.search_by_post


def test_server_post_search_timeout_is_retried_not_a_refusal(sleeps_source):
    source, rsps = sleeps_source
    rsps.post(SEARCH, body=requests.ReadTimeout("slow"))
    rsps.post(SEARCH, json=bundle(obs("o1")))
    assert ids(source.observations("example", codes=[HR])) == ["o1"]
    assert [c.request.method for c in rsps.calls] == ["POST", "POST"]
    assert rsps.calls[0].request.body == rsps.calls[1].request.body
    assert source.search_by_post


def test_server_refusal_whose_get_fails_too_is_not_remembered(server):
    """A 404 to POST and to GET (e.g. no such type at that base): the GET's error, and POST tried again."""
    source, rsps = server
    rsps.post(SEARCH, status=404)
    rsps.get(f"{BASE}/Observation", status=404,
             json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
    with pytest.raises(UpstreamNotFound, match="GET"):
        source.observations("example", codes=[HR])
    assert source.search_by_post


def test_server_post_search_redirected_into_a_get_is_a_refusal(server):
    """A 302 makes requests resend a POST as a GET without its form: never taken as the search's answer."""
    source, rsps = server
    rsps.post(SEARCH, status=302, headers={"Location": f"{BASE}/Observation/_search"})
    rsps.get(SEARCH, json=bundle(obs("everyone's")))
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    assert ids(source.observations("example", codes=[HR])) == ["o1"]
    assert not source.search_by_post


def test_server_search_without_codes_stays_a_get(server):
    source, rsps = server
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    assert ids(source.observations("example")) == ["o1"]
    assert [c.request.method for c in rsps.calls] == ["GET"]


@pytest.mark.parametrize("source", ["server", "folder"])
@pytest.mark.parametrize("patient", ["..", ".", "...", "a/b", ""])
def test_a_patient_id_of_dots_or_slashes_is_refused_before_any_read(source, patient, tmp_path) -> None:
    # '..' matches FHIR's id pattern but is a path segment: Patient/.. is the server base once normalised.
    with responses.RequestsMock():                   # no request may go out
        src = ServerSource(FhirClient(BASE)) if source == "server" else FolderSource(tmp_path)
        with pytest.raises(BadRequest) as caught:
            src.patient(patient)
    assert caught.value.expression == ["patient"]
