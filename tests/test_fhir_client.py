"""FhirClient against HTTP mocked at the transport: paging, retries, errors, token safety."""
from __future__ import annotations

import json
from email.utils import format_datetime as http_date
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
import urllib3
from responses import matchers

from fhir_ai.errors import BadRequest, UpstreamError, UpstreamNotFound, UpstreamTimeout
from fhir_ai.fhir.client import FhirClient, encode_params

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "fhir"
BASE = "https://fhir.hospital.example/r4"
TOKEN = "s3cr3t-token"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


class Sleeps(list):
    """Records the delays the client asked for instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps: Sleeps):
    with FhirClient(BASE, token=TOKEN, retries=3, retry_after_cap=30.0, sleep=sleeps) as c:
        yield c


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def test_get_sends_fhir_accept_and_bearer_token(client, mocked):
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    patient = client.get("Patient/example")
    assert patient["id"] == "example"
    sent = mocked.calls[0].request
    assert sent.headers["Accept"] == "application/fhir+json"
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Content-Type" not in sent.headers  # only writes carry a body
    assert TOKEN not in repr(client)


def test_no_authorization_header_without_token(mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    with FhirClient(BASE, sleep=sleeps) as anonymous:
        anonymous.get("Patient/example")
    assert "Authorization" not in mocked.calls[0].request.headers


def test_search_follows_next_links_over_three_pages(client, mocked):
    first = mocked.get(f"{BASE}/Observation", json=fixture("search-observation-page1.json"),
                       match=[matchers.query_param_matcher({"patient": "example", "_count": "2"})])
    for n, offset in ((2, 2), (3, 4)):
        mocked.get(f"{BASE}", json=fixture(f"search-observation-page{n}.json"),
                   match=[matchers.query_param_matcher(
                       {"_getpages": "4f1c9a", "_getpagesoffset": str(offset), "_count": "2"})])
    ids = [o["id"] for o in client.search("Observation", {"patient": "example", "_count": 2})]
    assert ids == ["hr-1", "hr-2", "hr-3", "hr-4", "hr-5"]
    assert first.call_count == 1
    assert len(mocked.calls) == 3
    assert all(c.request.headers["Authorization"] == f"Bearer {TOKEN}" for c in mocked.calls)


def test_search_skips_outcome_entries(client, mocked):
    bundle = fixture("search-observation-page3.json")
    bundle["entry"].append({"resource": fixture("operationoutcome-busy.json"),
                            "search": {"mode": "outcome"}})
    mocked.get(f"{BASE}/Observation", json=bundle)
    assert [r["resourceType"] for r in client.search("Observation", {})] == ["Observation"]


@pytest.mark.parametrize("entries", [["text"], [{"resource": "text"}], [{"resource": {"resourceType": "Observation"},
                                                                         "search": "match"}], {"resource": {}}])
def test_search_refuses_a_bundle_whose_entries_are_not_objects(client, mocked, entries):
    """A broken searchset is the server's fault, reported as such (502, not temporary), not a crash."""
    mocked.get(f"{BASE}/Observation", json={"resourceType": "Bundle", "type": "searchset", "entry": entries})
    with pytest.raises(UpstreamError, match="entries are not objects") as err:
        list(client.search("Observation", {}))
    assert err.value.status == 502 and not err.value.temporary


def test_next_link_to_another_host_is_refused_and_token_not_sent(client, mocked):
    page = fixture("search-observation-page1.json")
    page["link"][1]["url"] = "https://evil.example/r4/Observation?page=2"
    mocked.get(f"{BASE}/Observation", json=page)
    evil = mocked.get("https://evil.example/r4/Observation", json=fixture(
        "search-observation-page2.json"))
    results = client.search("Observation", {"patient": "example"})
    assert [next(results)["id"], next(results)["id"]] == ["hr-1", "hr-2"]
    with pytest.raises(UpstreamError) as err:
        next(results)
    assert err.value.temporary is False
    assert "another host" in err.value.message
    assert evil.call_count == 0


@pytest.mark.parametrize("url", ["http://fhir.hospital.example/r4/Observation?p=2",  # scheme
                                 "https://fhir.hospital.example:8443/r4/Observation?p=2"])  # port
def test_next_link_with_other_scheme_or_port_is_refused(client, mocked, url):
    page = fixture("search-observation-page3.json")
    page["link"].append({"relation": "next", "url": url})
    mocked.get(f"{BASE}/Observation", json=page)
    with pytest.raises(UpstreamError, match="another host"):
        list(client.search("Observation", {}))
    assert len(mocked.calls) == 1


def test_next_link_on_same_origin_with_explicit_default_port_is_followed(client, mocked):
    page = fixture("search-observation-page1.json")
    page["link"][1]["url"] = "https://FHIR.hospital.example:443/r4/Observation?page=2"
    mocked.get(f"{BASE}/Observation", json=page,
               match=[matchers.query_param_matcher({})])
    mocked.get("https://fhir.hospital.example:443/r4/Observation",
               json=fixture("search-observation-page3.json"),
               match=[matchers.query_param_matcher({"page": "2"})])
    assert len(list(client.search("Observation", {}))) == 3


def test_repeated_next_link_stops_paging(client, mocked):
    page = fixture("search-observation-page2.json")  # its next link points at itself below
    page["link"][1]["url"] = f"{BASE}/Observation?page=2"
    mocked.get(f"{BASE}/Observation", json=page)
    with pytest.raises(UpstreamError, match="paging stopped after 2 pages"):
        list(client.search("Observation", {}))


def test_429_honours_retry_after_seconds(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", status=429, headers={"Retry-After": "7"})
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    assert client.get("Patient/example")["id"] == "example"
    assert sleeps == [7.0]


def test_retry_after_is_capped(mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", status=429, headers={"Retry-After": "3600"})
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    with FhirClient(BASE, retry_after_cap=12.5, sleep=sleeps) as capped:
        capped.get("Patient/example")
    assert sleeps == [12.5]


def test_retry_after_http_date(client, mocked, sleeps):
    when = datetime.now(timezone.utc) + timedelta(seconds=20)
    mocked.get(f"{BASE}/Patient/example", status=503,
               headers={"Retry-After": http_date(when, usegmt=True)})
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    client.get("Patient/example")
    assert len(sleeps) == 1 and 17 <= sleeps[0] <= 20


def test_503_then_success_uses_backoff(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", status=503, json=fixture("operationoutcome-busy.json"))
    mocked.get(f"{BASE}/Patient/example", status=502)
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    assert client.get("Patient/example")["id"] == "example"
    assert sleeps == [1.0, 2.0]


def test_put_with_retries_zero_makes_one_attempt(client, mocked, sleeps):
    mocked.put(f"{BASE}/RiskAssessment/ra-1", status=503, json=fixture("operationoutcome-busy.json"))
    with pytest.raises(UpstreamError) as err:
        client.put({"resourceType": "RiskAssessment", "id": "ra-1", "status": "final"}, retries=0)
    assert err.value.temporary is True and "1 attempt(s)" in err.value.message
    assert len(mocked.calls) == 1 and sleeps == []


def test_retries_exhausted_is_502_with_outcome_text(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", status=503, json=fixture("operationoutcome-busy.json"))
    with pytest.raises(UpstreamError) as err:
        client.get("Patient/example")
    assert type(err.value) is UpstreamError
    assert err.value.status == 502
    assert err.value.temporary is True
    assert err.value.upstream_status == 503
    assert "Database connection pool exhausted" in err.value.message
    assert len(mocked.calls) == 4  # one try + 3 retries
    assert sleeps == [1.0, 2.0, 4.0]


def test_timeouts_exhausted_raise_upstream_timeout(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", body=requests.ReadTimeout("read timed out"))
    with pytest.raises(UpstreamTimeout) as err:
        client.get("Patient/example")
    assert err.value.status == 504
    assert len(mocked.calls) == 4
    assert len(sleeps) == 3


def test_connection_error_then_success(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", body=requests.ConnectionError("refused"))
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    assert client.get("Patient/example")["id"] == "example"
    assert sleeps == [1.0]


def test_timeout_is_passed_on_every_call(mocked, sleeps):
    seen = []

    class Recording(requests.Session):
        def send(self, *args, **kwargs):
            seen.append(kwargs.get("timeout"))
            return super().send(*args, **kwargs)

    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    mocked.put(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    with FhirClient(BASE, timeout=4.5, session=Recording(), sleep=sleeps) as c:
        c.get("Patient/example")
        c.put(fixture("patient-example.json"))
    assert seen == [4.5, 4.5]


def test_malformed_json_is_retried_then_succeeds(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", body="<html>proxy error</html>", status=200)
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    assert client.get("Patient/example")["id"] == "example"
    assert sleeps == [1.0]


def test_malformed_json_every_time_is_an_upstream_error_after_one_retry(client, mocked, sleeps):
    """A complete answer that is not JSON, twice: the server's own fault, not retried as a 503 is (4 tries)."""
    mocked.get(f"{BASE}/Patient/example", body="<html>proxy error</html>", status=200)
    with pytest.raises(UpstreamError, match="not JSON") as err:
        client.get("Patient/example")
    assert type(err.value) is UpstreamError and err.value.status == 502 and not err.value.temporary
    assert len(mocked.calls) == 2 and sleeps == [1.0]


@pytest.mark.parametrize("body", [
    '{"resourceType": "Bundle", "type": "searchset", "total": NaN}',
    '{"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType": "Observation", '
    '"valueQuantity": {"value": Infinity}}}]}',
    '{"resourceType": "Bundle"} and more',
])
def test_a_complete_answer_that_is_not_json_is_tried_twice_then_502_naming_the_path_only(client, mocked, sleeps,
                                                                                       body):
    """NaN, Infinity (what a server serialising floats naively writes) or trailing text: valid JSON has
    none of them, and the server writes them again on every try."""
    mocked.get(f"{BASE}/Observation", body=body, status=200, content_type="application/fhir+json")
    with pytest.raises(UpstreamError) as err:
        client.get("Observation", {"patient": "p-secret-1", "code": "8867-4"})
    assert err.value.status == 502 and not err.value.temporary and err.value.upstream_status == 200
    assert "GET /r4/Observation: " in err.value.message and "not JSON" in err.value.message
    assert "p-secret-1" not in err.value.message and "?" not in err.value.message
    assert len(mocked.calls) == 2 and sleeps == [1.0]


def test_json_after_a_byte_order_mark_is_read(client, mocked, sleeps):
    """RFC 8259 8.1: a parser may ignore a UTF-8 byte order mark (some .NET servers send one); orjson
    refuses it: it was 'a complete answer that is not JSON', 502 after two tries."""
    body = b"\xef\xbb\xbf" + json.dumps(fixture("patient-example.json")).encode()
    mocked.get(f"{BASE}/Patient/example", body=body, status=200, content_type="application/fhir+json")
    assert client.get("Patient/example")["id"] == "example"
    assert len(mocked.calls) == 1 and sleeps == []


def test_an_error_outcome_after_a_byte_order_mark_is_read(client, mocked):
    body = b"\xef\xbb\xbf" + json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "bad date"}]}).encode()
    mocked.get(f"{BASE}/Patient/example", body=body, status=400, content_type="application/fhir+json")
    with pytest.raises(UpstreamError, match="bad date"):
        client.get("Patient/example")


def test_a_read_answered_200_with_an_empty_body_is_retried_then_a_temporary_error(client, mocked, sleeps):
    """A read always has a body: none is an answer cut before its first byte, or a proxy - not the
    resource {} (a subscription then took the event as 'ignored': lost)."""
    mocked.get(f"{BASE}/Patient/example", body="", status=200)
    with pytest.raises(UpstreamError, match="empty body") as err:
        client.get("Patient/example")
    assert err.value.temporary and len(mocked.calls) == 1 + client.retries


def test_a_read_answered_200_with_an_empty_body_once_is_retried_to_success(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", body="", status=200)
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    assert client.get("Patient/example")["id"] == "example"


def test_a_complete_answer_that_is_not_json_once_is_retried_to_success(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/example", body='{"resourceType": "Patient", "id": NaN}', status=200)
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    assert client.get("Patient/example")["id"] == "example"
    assert sleeps == [1.0]


@pytest.mark.parametrize("body", [b'{"resourceType": "Patient", "id": "exa', b'{"resourceType": "Patient", "name": "\xc3',
                                  b'{"resourceType": "Patient", "id": "example"  \n'])
def test_an_answer_that_breaks_off_is_retried_as_a_temporary_fault(client, mocked, sleeps, body):
    """Cut where the connection broke (no Content-Length framed it), even inside a character: tried 4 times."""
    mocked.get(f"{BASE}/Patient/example", body=body, status=200)
    with pytest.raises(UpstreamError, match="breaks off") as err:
        client.get("Patient/example")
    assert err.value.temporary and len(mocked.calls) == 4 and sleeps == [1.0, 2.0, 4.0]


def test_over_a_real_connection_a_cut_answer_is_retried_and_a_complete_one_that_is_not_json_is_not_retried_twice():
    """A real socket: an answer framed by the connection's close and cut, one whose Content-Length
    promises more than comes (urllib3 refuses it), then a whole answer with NaN (twice): 4 connections,
    the first two retried as temporary, the NaN once only."""
    import socket
    import threading
    answers = [b"HTTP/1.0 200 OK\r\nContent-Type: application/fhir+json\r\n\r\n{\"resourceType\": \"Pat",
               b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\n"
               b"Connection: close\r\n\r\n{\"resourceType\": \"Pat"]
    nan = b'{"resourceType": "Patient", "id": "example", "weight": NaN}'
    answers += [b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(nan), nan)] * 3
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served: list[int] = []

    def serve() -> None:
        for answer in answers:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                served.append(len(served))       # before the answer: the client may be done once it has it
                connection.sendall(answer)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    delays: list[float] = []
    try:
        with FhirClient(f"http://127.0.0.1:{port}/fhir", timeout=2, retries=5, backoff=0.0,
                        sleep=delays.append) as server:
            with pytest.raises(UpstreamError) as caught:
                server.get("Patient/example")
        assert not caught.value.temporary and "not JSON" in caught.value.message
        assert "4 attempt" in caught.value.message and len(served) == 4 and len(delays) == 3
    finally:
        listener.close()


def test_404_with_outcome_is_upstream_not_found(client, mocked, sleeps):
    mocked.get(f"{BASE}/Patient/unknown", status=404,
               json=fixture("operationoutcome-not-found.json"))
    with pytest.raises(UpstreamNotFound) as err:
        client.get("Patient/unknown")
    assert err.value.status == 404
    assert "Resource Patient/unknown is not known" in err.value.message
    assert sleeps == [] and len(mocked.calls) == 1  # not retried


def test_410_is_upstream_not_found(client, mocked):
    mocked.get(f"{BASE}/Patient/gone", status=410)
    with pytest.raises(UpstreamNotFound):
        client.get("Patient/gone")


def test_403_says_credentials_refused_and_is_not_retried(client, mocked, sleeps):
    mocked.get(f"{BASE}/Observation", status=403, json=fixture("operationoutcome-forbidden.json"))
    with pytest.raises(UpstreamError) as err:
        list(client.search("Observation", {"patient": "example"}))
    assert err.value.temporary is False and err.value.upstream_status == 403
    assert "refused our credentials" in err.value.message
    assert "Token lacks scope patient/Observation.read" in err.value.message
    assert TOKEN not in err.value.message
    assert sleeps == []


def test_400_uses_diagnostics_when_no_details_text(client, mocked):
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": "invalid", "diagnostics": "Unknown param"}]}
    mocked.get(f"{BASE}/Observation", status=400, json=outcome)
    with pytest.raises(UpstreamError, match="HTTP 400: Unknown param") as err:
        list(client.search("Observation", {"bogus": "1"}))
    assert err.value.temporary is False and err.value.upstream_status == 400


def test_put_by_id_with_fhir_json_body(client, mocked):
    resource = {"resourceType": "RiskAssessment", "id": "ra-1", "status": "final",
                "subject": {"reference": "Patient/example"}}
    mocked.put(f"{BASE}/RiskAssessment/ra-1", status=201,
               json={**resource, "meta": {"versionId": "1"}},
               match=[matchers.json_params_matcher(resource)])
    body = client.put(resource)
    assert body["meta"]["versionId"] == "1"
    sent = mocked.calls[0].request
    assert sent.headers["Content-Type"] == "application/fhir+json"
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"


def test_put_empty_body_returns_empty_dict(client, mocked):
    mocked.put(f"{BASE}/RiskAssessment/ra-1", status=200, body="")
    assert client.put({"resourceType": "RiskAssessment", "id": "ra-1"}) == {}


def test_put_needs_an_id(client):
    with pytest.raises(BadRequest):
        client.put({"resourceType": "RiskAssessment"})


def test_post_passes_extra_headers(client, mocked):
    mocked.post(f"{BASE}/RiskAssessment", status=201, body="",
                match=[matchers.header_matcher({"If-None-Exist": "identifier=x|1"})])
    assert client.post("RiskAssessment", {"resourceType": "RiskAssessment"},
                       headers={"If-None-Exist": "identifier=x|1"}) == {}


def test_absolute_url_to_other_host_refused_for_get(client, mocked):
    with pytest.raises(UpstreamError, match="another host"):
        client.get("https://elsewhere.example/r4/Patient/example")
    assert len(mocked.calls) == 0


@pytest.mark.parametrize("url, params", [
    ("Observation", [("patient", "p-1"), ("date", "ge2026-11-20T08:00:00+09:00"), ("_count", 200),
                     ("code", "http://loinc.org|8867-4,urn:oid:1.2.410.100|HR LOCAL,\u00e9tat|x&y=z")]),
    ("Observation", {"patient": "p-1", "code": ["a|b", "c"], "skipped": None, "n": 3.5}),
    ("Observation?_getpages=abc&_offset=10", [("extra", "1")]),
    ("Patient/example", None),
    ("Observation", [("value", "~ spaced + plus %25 [x]")]),
    ("Observation", [("code", "http://x.example/cs|a\\,b\\|c\\$d"), ("q", "?@!$'()*;#/:=&")]),
    ("Observation", "patient=p-1&code=http://loinc.org%7C8867-4,http://loinc.org%7C9279-1"),
])
def test_the_query_is_what_requests_builds_from_it_and_means_what_params_mean(url: str, params) -> None:
    """The client appends the query itself (requests and urllib3 re-parse long URLs char by char) and
    leaves ':', '/' and ',' unescaped, where requests' own encoding of ``params`` escapes them: the URL
    is byte for byte what requests builds from that query, urllib3 sends it unchanged, and a server
    decodes it to the very parameters of the URL requests builds from ``params``."""
    client = FhirClient(BASE)
    ours = client._prepare("GET", f"{BASE}/{url}", params, None, {"Accept": "application/fhir+json"})
    query = encode_params(params)
    from_query = requests.Session().prepare_request(requests.Request("GET", f"{BASE}/{url}",
                                                                     params=query or None))
    assert ours.url == from_query.url
    assert urllib3.util.parse_url(ours.url).url == ours.url          # nothing for urllib3 to re-escape
    from_params = requests.Session().prepare_request(requests.Request("GET", f"{BASE}/{url}", params=params))
    assert (parse_qsl(urlsplit(ours.url).query, keep_blank_values=True)
            == parse_qsl(urlsplit(from_params.url).query, keep_blank_values=True))
    assert urlsplit(ours.url)[:3] == urlsplit(from_params.url)[:3]


def test_query_keeps_colon_slash_comma_and_escapes_the_rest() -> None:
    """The deliberate difference from requests' encoding, and what stays escaped."""
    assert encode_params([("code", "http://loinc.org|8867-4,x\\,y"), ("date", "ge2026-11-20T08:00:00+09:00"),
                          ("q", "a b&c=d?e@f")]) == (
        "code=http://loinc.org%7C8867-4,x%5C,y&date=ge2026-11-20T08:00:00%2B09:00&q=a+b%26c%3Dd%3Fe%40f")
    assert encode_params("already=encoded,as:is") == "already=encoded,as:is"
    assert encode_params([]) == encode_params(None) == ""


@pytest.mark.parametrize("method, data, headers", [
    ("GET", None, {"Accept": "application/fhir+json"}),
    ("GET", None, {"Accept": "application/fhir+json", "Authorization": "Bearer t", "X-Extra": "1"}),
    ("PUT", b'{"resourceType":"Basic"}', {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}),
    ("POST", b"{}", {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json",
                     "User-Agent": "ours"}),
])
@pytest.mark.parametrize("cookie", [False, True])
def test_own_session_requests_are_prepared_as_the_session_prepares_them(method, data, headers, cookie) -> None:
    """Our session's requests skip Session.prepare_request's slow merging: same request all the same."""
    client = FhirClient(BASE)
    if cookie:   # e.g. a load balancer's affinity cookie set by an earlier answer
        client.session.cookies.set("AWSALB", "sticky", domain="fhir.hospital.example", path="/")
    ours = client._prepare(method, f"{BASE}/Observation", None, data, headers)
    theirs = client.session.prepare_request(requests.Request(method, f"{BASE}/Observation", data=data,
                                                             headers=headers))
    assert (ours.method, ours.url, ours.body) == (theirs.method, theirs.url, theirs.body)
    assert list(ours.headers.items()) == list(theirs.headers.items())
    assert ours.hooks == theirs.hooks
    assert ("Cookie" in ours.headers) is cookie


def test_a_cookie_the_server_sets_is_sent_back(client, mocked):
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"),
               headers={"Set-Cookie": "AWSALB=sticky; Path=/"})
    client.get("Patient/example")
    client.get("Patient/example")
    assert "Cookie" not in mocked.calls[0].request.headers
    assert mocked.calls[1].request.headers["Cookie"] == "AWSALB=sticky"


def test_a_redirect_is_followed_with_the_cookie_set_on_the_way(client, mocked):
    """Our session sends by its adapter: a redirect is still followed (by the session), and a cookie the
    redirecting answer sets goes with the request it points to."""
    mocked.get(f"{BASE}/Patient/old", status=301, headers={"Location": f"{BASE}/Patient/example",
                                                           "Set-Cookie": "AWSALB=sticky; Path=/"})
    mocked.get(f"{BASE}/Patient/example", json=fixture("patient-example.json"))
    assert client.get("Patient/old")["id"] == "example"
    assert [c.request.url for c in mocked.calls] == [f"{BASE}/Patient/old", f"{BASE}/Patient/example"]
    assert mocked.calls[1].request.headers["Cookie"] == "AWSALB=sticky"
    assert mocked.calls[1].request.headers["Accept"] == "application/fhir+json"


def test_a_redirect_to_another_host_is_not_followed(client, mocked):
    """A 307/308 would re-send our PUT or search form to whatever host it names: refused, nothing sent there."""
    mocked.put(f"{BASE}/RiskAssessment/ra-1", status=307,
               headers={"Location": "https://elsewhere.example/r4/RiskAssessment/ra-1"})
    with pytest.raises(UpstreamError, match="redirected to another host") as caught:
        client.put({"resourceType": "RiskAssessment", "id": "ra-1", "status": "final"})
    assert not caught.value.temporary
    assert [c.request.url for c in mocked.calls] == [f"{BASE}/RiskAssessment/ra-1"]


def test_a_body_that_stalls_after_the_headers_is_a_timeout_and_retried() -> None:
    """Our session reads the body inside the retry handling: a server that sends its headers and then
    stops is retried and reported as a timeout, never a raw requests error."""
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def serve() -> None:
        while len(accepted) < 2:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                               b"Content-Length: 1000\r\n\r\n{\"resourceType\": \"Bun")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with FhirClient(f"http://127.0.0.1:{port}/fhir", timeout=0.3, retries=1, backoff=0.0,
                        sleep=lambda s: None) as stalled:
            with pytest.raises(UpstreamError) as caught:
                stalled.get("Patient/example")
        assert caught.value.temporary
        assert "2 attempt" in caught.value.message
        assert len(accepted) == 2
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


def test_an_answer_trickling_past_the_deadline_is_cut_off_at_the_deadline() -> None:
    """Each socket read is bounded by the timeout, not the whole answer: a server sending a byte every
    50 ms never trips a 0.3 s read timeout. A caller with a deadline (a CDS hook) is answered at the
    deadline, not when the trickle ends (5 s)."""
    import socket
    import threading
    import time as clock
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            body = b'{"resourceType": "Patient", "id": "example", "x": "' + b"a" * 60 + b'"}'
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            for byte in body:
                if stop.wait(0.05):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return
    threading.Thread(target=serve, daemon=True).start()
    started = clock.monotonic()
    try:
        with FhirClient(f"http://127.0.0.1:{port}/fhir", timeout=0.3, retries=2, backoff=0.0,
                        deadline=started + 0.6, sleep=lambda s: None) as waiting:
            with pytest.raises(UpstreamTimeout):
                waiting.get("Patient/example")
        assert clock.monotonic() - started < 2.0
    finally:
        stop.set()
        listener.close()


def test_an_answer_that_has_arrived_by_the_deadline_is_taken_however_long() -> None:
    """Past the deadline, what has already arrived is still read: a 300 kB answer sent at once is taken
    even when the deadline passes after its first piece (the clock jumps there and stays)."""
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    big = {"resourceType": "Patient", "id": "example", "text": {"status": "generated", "div": "x" * 300_000}}
    body = json.dumps(big).encode()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            connection.recv(1)
    threading.Thread(target=serve, daemon=True).start()
    readings = iter([0.0, 0.0])
    clock = lambda: next(readings, 10.01)     # noqa: E731  # the deadline (10.0) passes after the first piece
    try:
        with FhirClient(f"http://127.0.0.1:{port}/fhir", timeout=5, retries=0, deadline=10.0,
                        clock=clock, sleep=lambda s: None) as waiting:
            assert waiting.get("Patient/example") == big
    finally:
        listener.close()


# -- search by POST [type]/_search ------------------------------------------------------------

def searchset(*ids: str, next_url: str | None = None) -> dict:
    bundle = {"resourceType": "Bundle", "type": "searchset",
              "entry": [{"resource": {"resourceType": "Observation", "id": i}} for i in ids]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def test_post_search_sends_the_parameters_as_a_form(client, mocked):
    params = [("patient", "p1"), ("code", "http://loinc.org|8867-4,http://loinc.org|9279-1"), ("_count", 200)]
    mocked.post(f"{BASE}/Observation/_search", json=searchset("o1", next_url=f"{BASE}/Observation?page=2"))
    mocked.get(f"{BASE}/Observation", json=searchset("o2"), match=[matchers.query_param_matcher({"page": "2"})])
    assert [r["id"] for r in client.search("Observation", params, post=True)] == ["o1", "o2"]
    posted, paged = (call.request for call in mocked.calls)
    assert posted.method == "POST" and posted.url == f"{BASE}/Observation/_search"
    assert posted.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert posted.headers["Accept"] == "application/fhir+json"
    assert posted.headers["Authorization"] == f"Bearer {TOKEN}"
    assert parse_qsl(posted.body.decode()) == [(k, str(v)) for k, v in params]
    assert posted.body.decode() == encode_params(params)          # the very text a GET would carry
    assert paged.method == "GET"


def test_post_search_is_retried_like_a_read(client, mocked, sleeps):
    """429 with Retry-After, 503, a timeout and a broken body: retried with the same form, as a GET is."""
    url = f"{BASE}/Observation/_search"
    mocked.post(url, status=429, headers={"Retry-After": "3"})
    mocked.post(url, status=503)
    mocked.post(url, body=requests.ReadTimeout("slow"))
    mocked.post(url, body="<html>oops</html>", status=200)
    with pytest.raises(UpstreamError) as raised:
        list(client.search("Observation", {"patient": "p1"}, post=True))
    assert raised.value.temporary and "not JSON" in str(raised.value)
    assert sleeps == [3.0, 2.0, 4.0]
    assert len({call.request.body for call in mocked.calls}) == 1 and len(mocked.calls) == 4


def test_post_search_answered_200_with_an_empty_body_is_retried_then_a_temporary_error(client, mocked, sleeps):
    """A search page by POST _search always has a body, as one by GET does: none is an answer cut before
    its first byte, or a proxy. Before, it was read as {} - 'not a Bundle', permanent, not retried."""
    mocked.post(f"{BASE}/Observation/_search", body="", status=200)
    with pytest.raises(UpstreamError, match="empty body") as err:
        list(client.search("Observation", {"patient": "p1"}, post=True))
    assert err.value.temporary and len(mocked.calls) == 1 + client.retries
    assert {call.request.method for call in mocked.calls} == {"POST"}


def test_post_search_answered_200_with_an_empty_body_once_is_retried_to_success(client, mocked, sleeps):
    mocked.post(f"{BASE}/Observation/_search", body="", status=200)
    mocked.post(f"{BASE}/Observation/_search", json=searchset("o1"))
    assert [r["id"] for r in client.search("Observation", {"patient": "p1"}, post=True)] == ["o1"]


def test_a_post_that_is_not_a_search_answered_200_with_an_empty_body_is_still_empty(client, mocked):
    mocked.post(f"{BASE}/Observation/$validate", body="", status=200)
    assert client.post("Observation/$validate", {"resourceType": "Observation"}) == {}


def test_post_search_renews_the_token_once_on_401(mocked, sleeps):
    class Renewing:
        def __init__(self) -> None:
            self.token, self.renewed = "old", 0

        def headers(self) -> dict[str, str]:
            return {"Authorization": f"Bearer {self.token}"}

        def on_unauthorized(self) -> None:
            self.token, self.renewed = "new", self.renewed + 1

    auth = Renewing()
    mocked.post(f"{BASE}/Observation/_search", status=401)
    mocked.post(f"{BASE}/Observation/_search", json=searchset("o1"))
    with FhirClient(BASE, auth=auth, sleep=sleeps) as authed:
        assert [r["id"] for r in authed.search("Observation", {"patient": "p1"}, post=True)] == ["o1"]
    assert auth.renewed == 1
    assert [c.request.headers["Authorization"] for c in mocked.calls] == ["Bearer old", "Bearer new"]
