"""CDS Hooks fetches from the EHR's fhirServer: quick retries within the hook's time budget, and the
memory of servers that refuse POST _search kept across hook calls."""
from __future__ import annotations

from typing import Any

import pytest
import requests
import responses
from flask.testing import FlaskClient

from fhir_ai.cds import prefetch
from fhir_ai.cds.prefetch import ServerMemory

from test_cds_hooks import (FHIR, TOKEN, call, ehr_server_allowed, full_prefetch, hook_request,  # noqa: F401
                            record, searchset, the_card)

BUDGET = 5.0


class FakeTime:
    """The hook's clock and sleep: a sleep moves the clock on, nothing really waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def settings_overrides(settings_overrides: dict[str, Any]) -> dict[str, Any]:
    settings_overrides["cds_require_jwt"] = False     # as in test_cds_hooks.py
    settings_overrides["cds_fetch_timeout"] = BUDGET
    return settings_overrides


@pytest.fixture(autouse=True)
def fake_time(monkeypatch: pytest.MonkeyPatch) -> Any:
    time = FakeTime()
    monkeypatch.setattr(prefetch, "clock", time.clock)
    monkeypatch.setattr(prefetch, "sleep", time.sleep)
    prefetch.GET_ONLY.clear()
    yield time
    prefetch.GET_ONLY.clear()     # the memory is process-wide: leave none to other tests


def without(record: dict[str, Any], key: str) -> dict[str, Any]:  # noqa: F811
    body = full_prefetch(record)
    del body[key]
    return body


def taking(time: FakeTime, seconds: float, status: int, body: str = "") -> Any:
    """A responses callback for an answer that takes ``seconds`` of the hook's clock."""
    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        time.now += seconds
        return status, {"Content-Type": "application/fhir+json"}, body
    return answer


def diagnostics(response: Any) -> str:
    return response.json["issue"][0]["diagnostics"]


# -- retries ------------------------------------------------------------------------------------------

def test_a_503_is_retried_and_the_card_comes(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                             fake_time: FakeTime) -> None:
    with responses.RequestsMock() as rsps:
        search = f"{FHIR}/Observation/_search"
        rsps.post(search, status=503)
        rsps.post(search, json=searchset(record["observations"]))
        card = the_card(call(client, hook_request(record, prefetch=without(record, "observations"))))
        assert [c.request.url for c in rsps.calls] == [search, search]
    assert fake_time.sleeps == [0.25]
    assert "Based on 20 observation" in card["detail"]


def test_a_reset_connection_and_a_timeout_are_retried(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                                      fake_time: FakeTime) -> None:
    url = f"{FHIR}/Patient/{record['patient']['id']}"
    with responses.RequestsMock() as rsps:
        rsps.get(url, body=requests.ConnectionError("Connection reset by peer"))
        rsps.get(url, body=requests.ReadTimeout("read timed out"))
        rsps.get(url, json=record["patient"])
        the_card(call(client, hook_request(record, prefetch=without(record, "patient"))))
        assert len(rsps.calls) == 3
    assert fake_time.sleeps == [0.25, 0.5]


def test_retry_after_within_the_budget_is_honoured(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                                   fake_time: FakeTime) -> None:
    with responses.RequestsMock() as rsps:
        search = f"{FHIR}/Observation/_search"
        rsps.post(search, status=429, headers={"Retry-After": "2"})
        rsps.post(search, json=searchset(record["observations"]))
        the_card(call(client, hook_request(record, prefetch=without(record, "observations"))))
        assert len(rsps.calls) == 2
    assert fake_time.sleeps == [2.0]


@pytest.mark.parametrize("retry_after", ["60", "5"])
def test_retry_after_beyond_the_budget_fails_at_once(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                                     fake_time: FakeTime, retry_after: str) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{FHIR}/Observation/_search", status=429, headers={"Retry-After": retry_after})
        response = call(client, hook_request(record, prefetch=without(record, "observations")))
        assert len(rsps.calls) == 1
    assert fake_time.sleeps == []
    assert response.status_code == 412
    assert response.json["issue"][0]["expression"] == ["prefetch.observations"]
    assert "cannot obtain Observations" in diagnostics(response)
    assert "HTTP 429" in diagnostics(response) and "deadline" in diagnostics(response)


def test_no_wait_passes_the_deadline(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                     fake_time: FakeTime) -> None:
    # The first answer takes 4.9 of the 5 s: the 0.25 s backoff would pass the deadline.
    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.POST, f"{FHIR}/Observation/_search", callback=taking(fake_time, 4.9, 503))
        response = call(client, hook_request(record, prefetch=without(record, "observations")))
        assert len(rsps.calls) == 1
    assert fake_time.sleeps == []
    assert response.status_code == 412


def test_each_attempt_gets_only_the_time_left(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                              fake_time: FakeTime) -> None:
    search = f"{FHIR}/Observation/_search"
    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.POST, search, callback=taking(fake_time, 3.0, 502))
        rsps.post(search, json=searchset(record["observations"]))
        the_card(call(client, hook_request(record, prefetch=without(record, "observations"))))
        timeouts = [c.request.req_kwargs["timeout"] for c in rsps.calls]
    assert timeouts == [BUDGET, pytest.approx(BUDGET - 3.0 - 0.25)]


def test_the_budget_is_for_all_fetches_of_a_call(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                                 fake_time: FakeTime) -> None:
    body = hook_request(record, prefetch={})
    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.GET, f"{FHIR}/Patient/{record['patient']['id']}",
                          callback=taking(fake_time, BUDGET, 200, '{"resourceType": "Patient", "id": "%s"}'
                                          % record["patient"]["id"]))
        response = call(client, body)
        assert len(rsps.calls) == 1        # the Encounter was not asked for: no time was left
    assert response.status_code == 412
    assert response.json["issue"][0]["expression"] == ["prefetch.encounter"]


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried(client: FlaskClient, record: dict[str, Any],  # noqa: F811
                                       fake_time: FakeTime, status: int) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{FHIR}/Patient/{record['patient']['id']}", status=status)
        response = call(client, hook_request(record, prefetch=without(record, "patient")))
        assert len(rsps.calls) == 1
    assert fake_time.sleeps == []
    assert response.status_code == 412


def test_a_fhir_server_with_a_bad_port_is_400(client: FlaskClient, record: dict[str, Any]) -> None:  # noqa: F811
    body = hook_request(record, prefetch=without(record, "patient"))
    body["fhirServer"] = "https://ehr.example.org:fhir/r4"
    response = call(client, body)
    assert response.status_code == 400
    assert response.json["issue"][0]["expression"] == ["fhirServer"]


# -- servers that refuse POST _search -------------------------------------------------------------------

def test_a_server_refusing_post_search_is_searched_by_get_from_the_next_call(
        client: FlaskClient, record: dict[str, Any]) -> None:  # noqa: F811
    body = without(record, "observations")
    with responses.RequestsMock() as rsps:
        post = rsps.post(f"{FHIR}/Observation/_search", status=405)
        get = rsps.get(f"{FHIR}/Observation", json=searchset(record["observations"]))
        the_card(call(client, hook_request(record, prefetch=body)))
        assert (post.call_count, get.call_count) == (1, 1)
        the_card(call(client, hook_request(record, prefetch=body)))
        assert (post.call_count, get.call_count) == (1, 2)
    assert prefetch.GET_ONLY.has(FHIR + "/")
    assert not prefetch.GET_ONLY.has("https://other-ehr.example.org/fhir")


def test_a_refusal_whose_get_fails_too_is_not_remembered(client: FlaskClient, record: dict[str, Any]) -> None:  # noqa: F811
    with responses.RequestsMock() as rsps:
        rsps.post(f"{FHIR}/Observation/_search", status=405)
        rsps.get(f"{FHIR}/Observation", status=403)
        response = call(client, hook_request(record, prefetch=without(record, "observations")))
    assert response.status_code == 412
    assert not prefetch.GET_ONLY.has(FHIR)


def test_server_memory_is_bounded_forgets_and_keeps_no_credentials(fake_time: FakeTime) -> None:
    memory = ServerMemory(size=2, ttl=60.0)
    memory.add(f"https://user:{TOKEN}@ehr.example.org/fhir/")
    assert memory.has("HTTPS://ehr.example.org/fhir")
    assert TOKEN not in repr(memory._added) and "user" not in repr(memory._added)
    memory.add("https://b.example.org/fhir")
    memory.add("https://c.example.org/fhir")           # the oldest is dropped
    assert not memory.has("https://ehr.example.org/fhir")
    assert memory.has("https://b.example.org/fhir") and memory.has("https://c.example.org/fhir")
    fake_time.now += 60.0                              # POST _search is asked for again after ttl
    assert not memory.has("https://b.example.org/fhir")


@pytest.mark.parametrize("server, allowed", [
    ("https://ehr.example.org/fhir", True),
    ("https://ehr.example.org/fhir/", True),
    ("https://EHR.example.org:443/fhir/r4", True),                   # same origin, a deeper base
    ("https://ehr.example.org.attacker.test/fhir", False),           # a host that only starts the same
    ("https://ehr.example.org@attacker.test/fhir", False),           # user information: the host is attacker.test
    ("https://ehr.example.org/fhir-test", False),                    # not a path segment of the allowed base
    ("https://ehr.example.org/other", False),
    ("http://ehr.example.org/fhir", False),                          # another scheme
    ("https://ehr.example.org:8443/fhir", False),                    # another port
    ("https://ehr.example.org\\@attacker.test/fhir", False),
    ("https://ehr.example.org/fhir?x=1", False),
    ("https://ehr.example.org:99999/fhir", False),
    ("javascript:alert(1)", False), (None, False), (["https://ehr.example.org/fhir"], False),
])
def test_the_fhir_server_allow_list_compares_origin_and_path_segments(server, allowed):
    from fhir_ai.cds.prefetch import server_allowed
    assert server_allowed(server, "https://ehr.example.org/fhir") is allowed


@pytest.mark.parametrize("server, status", [("https://ehr.example.org.attacker.test/fhir", 412),
                                            ("https://ehr.example.org@attacker.test/fhir", 400)])
def test_a_fhir_server_that_only_looks_allowed_is_refused_and_never_called(settings_overrides, record,  # noqa: F811
                                                                           server, status) -> None:
    """FHIR_AI_CDS_FHIR_SERVERS=https://ehr.example.org: a fhirServer whose text merely starts with it is
    another host (412: not one this service may call), one with user information no plain base URL (400);
    neither is sent the EHR's access token (nor anything else)."""
    from fhir_ai.app import create_app
    settings_overrides["cds_fhir_servers"] = "https://ehr.example.org"
    app = create_app(settings_overrides)
    try:
        body = hook_request(record, prefetch=without(record, "observations"))
        body["fhirServer"] = server
        with responses.RequestsMock() as rsps:                  # any request sent would fail the test
            response = call(app.test_client(), body)
            assert not rsps.calls
        assert response.status_code == status
        assert response.get_json()["issue"][0]["expression"] == ["fhirServer"]
    finally:
        app.extensions["fhir_ai"].close()


@pytest.mark.parametrize("setting, source, allowed", [
    (None, None, False),                       # unset, the source a folder (the demo): no server at all
    (None, FHIR, True),                        # unset: the hospital server fhir_ai reads from ...
    (None, "https://other.example.org/fhir", False),   # ... and no other
    ("*", None, True),                         # any (closed networks)
    ("https://other.example.org/fhir", FHIR, False),   # a list replaces the default
])
def test_which_fhir_servers_a_hook_may_make_fhir_ai_call(settings_overrides, record, setting,  # noqa: F811
                                                         source, allowed) -> None:
    """Least privilege: unless FHIR_AI_CDS_FHIR_SERVERS says otherwise, a hook's fhirServer must be the
    hospital server fhir_ai is configured to read (FHIR_AI_SOURCE_URL); an EHR cannot make it call, and send
    the access token to, a host nobody configured."""
    from fhir_ai.app import create_app
    if setting is None:
        settings_overrides.pop("cds_fhir_servers", None)
    else:
        settings_overrides["cds_fhir_servers"] = setting
    if source is not None:
        settings_overrides["source_url"] = source
    app = create_app(settings_overrides)
    try:
        body = hook_request(record, prefetch=without(record, "patient"))
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
            rsps.get(f"{FHIR}/Patient/{record['patient']['id']}", json=record["patient"])
            response = call(app.test_client(), body)
            assert len(rsps.calls) == (1 if allowed else 0)
        if allowed:
            assert response.status_code == 200, response.get_json()
        else:
            assert response.status_code == 412
            outcome = response.get_json()["issue"][0]
            assert outcome["expression"] == ["fhirServer"] and "cds_fhir_servers" in outcome["diagnostics"]
    finally:
        app.extensions["fhir_ai"].close()


def test_any_server_cannot_be_combined_with_a_list() -> None:
    from fhir_ai.config import load_settings
    from fhir_ai.errors import ConfigurationError
    with pytest.raises(ConfigurationError, match="CDS_FHIR_SERVERS"):
        load_settings({"cds_fhir_servers": "*, https://ehr.example.org/fhir"}, environ={})
