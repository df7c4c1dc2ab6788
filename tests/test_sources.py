"""The two data sources (server, folder) and the FHIR time helpers they share."""
from __future__ import annotations

import gzip
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from responses import matchers

from fhir_ai.errors import BadRequest, ConfigurationError, NotSupported, UpstreamNotFound
from fhir_ai.fhir import FolderSource, ServerSource, make_source
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


def test_server_observation_query_with_codes_and_dates(server):
    source, rsps = server
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    since, until = utc(2024, 5, 6), datetime.fromisoformat("2024-05-06T18:00:00+09:00")
    assert ids(source.observations("example", codes=[HR, ("", "x,y")], since=since,
                                   until=until)) == ["o1"]
    query = parse_qs(urlsplit(rsps.calls[0].request.url).query)
    assert query["patient"] == ["example"]
    assert query["code"] == ["http://loinc.org|8867-4,x\\,y"]
    assert query["date"] == ["ge2024-05-06T00:00:00Z", "le2024-05-06T09:00:00Z"]
    assert query["_count"] == ["200"]


def test_server_long_code_lists_are_split_and_deduplicated(server):
    source, rsps = server
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


def test_server_observation_query_is_sent_compact(server):
    """':', '/' and ',' go out as they are (FHIR's own form), '|' and the escaping backslash escaped."""
    source, rsps = server
    rsps.get(f"{BASE}/Observation", json=bundle(obs("o1")))
    source.observations("example", codes=[HR, ("", "x,y")], since=utc(2024, 5, 6))
    assert rsps.calls[0].request.url == (f"{BASE}/Observation?patient=example&date=ge2024-05-06T00:00:00Z"
                                         "&_count=200&code=http://loinc.org%7C8867-4,x%5C,y")


def test_server_code_chunks_are_filled_up_to_max_url(server):
    """Each split search but the last would pass MAX_URL with the next code: no more searches than needed."""
    source, rsps = server
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
