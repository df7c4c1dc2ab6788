"""Subscriptions when something fails: the broker refuses a rescoring after the notification was
recorded, an event number too large for the event log, a catch-up claim whose lease lapsed, and a
refused notification's audit trail (real Redis)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from kombu.exceptions import OperationalError

import fhir_ai.subscriptions as subscriptions
from fhir_ai.jobs import tasks
from fhir_ai.subscriptions import CatchUp, Debouncer, EventLog, Event, Notification, handle, parse_notification
from test_subscriptions import (NOW, SECRET, diagnostics, events_since_start, heart_rate, notification,  # noqa: F401
                                post, queued, redis_or_skip, sc, sub_app)


class NoSearch:
    """A source nobody searches: ``catch_up`` is replaced in these tests."""


@pytest.fixture
def log_and_gate() -> Iterator[tuple[redis.Redis, EventLog, Debouncer]]:
    client = redis_or_skip()
    prefix = f"fhir_ai:test-{uuid.uuid4().hex[:8]}:"
    yield client, EventLog(client, prefix + "subscription:"), Debouncer(client, 30, prefix + "rescore:")
    client.delete(*client.keys(f"{prefix}*") or ["-"])


class Searches:
    """Catch-up searches made (when from), and the patients the next ones find."""

    def __init__(self) -> None:
        self.since: list[datetime] = []
        self.found: list[str] = []

    def __call__(self, _source: Any, since: datetime, _codes: Any, **_options: Any) -> CatchUp:
        self.since.append(since)
        return CatchUp(list(self.found))


@pytest.fixture
def searches(monkeypatch: pytest.MonkeyPatch) -> Searches:
    made = Searches()
    monkeypatch.setattr(subscriptions, "catch_up", made)
    return made


def event(number: int, patient: str) -> Notification:
    return parse_notification(notification("event-notification", [heart_rate(patient)], start=number))


def broker_down(_patient: str) -> None:
    raise RuntimeError("the broker is down")


def test_a_notification_recorded_but_not_queued_is_caught_up_if_the_hospital_gives_up_on_it(
        log_and_gate: Any, searches: Any) -> None:
    """Event 6 is recorded, its rescoring cannot be queued (503); the hospital's server gives up on
    it. Event 7 shows no gap in the numbers, but the catch-up for 6 is owed, from when 5 was seen."""
    _, events, gate = log_and_gate
    done: list[str] = []
    handle(event(5, "p5"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events, now=NOW)
    with pytest.raises(RuntimeError):
        handle(event(6, "p6"), source=NoSearch(), codes=[], debounce=gate, enqueue=broker_down, events=events,
               now=NOW + timedelta(minutes=1))
    searches.found[:] = ["p6"]
    out = handle(event(7, "p7"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events,
                 now=NOW + timedelta(minutes=2))
    assert out.missed == 1 and searches.since == [NOW - EventLog.MARGIN]
    assert done == ["p5", "p6", "p7"]       # p6's debounce key was released when its queuing failed
    assert handle(event(8, "p8"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events,
                  now=NOW + timedelta(minutes=3)).missed == 0     # settled


def test_a_catch_up_whose_patients_were_not_queued_stays_owed_for_the_retry(log_and_gate: Any,
                                                                            searches: Any) -> None:
    """Event 8 after 5: the catch-up finds p9, whose queuing fails. The hospital's server sends 8
    again: the catch-up runs again and p9 is queued (not 'already queued'), p8 too."""
    _, events, gate = log_and_gate
    done: list[str] = []
    handle(event(5, "p5"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events, now=NOW)
    searches.found[:] = ["p9"]
    with pytest.raises(RuntimeError):
        handle(event(8, "p8"), source=NoSearch(), codes=[], debounce=gate, enqueue=broker_down, events=events,
               now=NOW + timedelta(minutes=1))
    out = handle(event(8, "p8"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events,
                 now=NOW + timedelta(minutes=2))
    assert out.missed >= 2 and out.recovered == ["p9"] and out.queued == ["p9", "p8"]
    assert searches.since == [NOW - EventLog.MARGIN] * 2


def test_a_queuing_failure_halfway_releases_only_the_patients_not_queued(log_and_gate: Any,
                                                                         searches: Any) -> None:
    _, events, gate = log_and_gate
    done: list[str] = []

    def second_fails(patient: str) -> None:
        if done:
            raise RuntimeError("the broker is down")
        done.append(patient)
    two = parse_notification(notification("event-notification", [heart_rate("p1"), heart_rate("p2")], start=1))
    with pytest.raises(RuntimeError):
        handle(two, source=NoSearch(), codes=[], debounce=gate, enqueue=second_fails, events=events, now=NOW)
    assert done == ["p1"] and not gate.claim("p1") and gate.claim("p2")


def test_the_endpoint_answers_503_and_the_retry_queues_the_patient(sc: FlaskClient, queued: list,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The rescoring is asked for by the subscription (the assessment's AuditEvent names it)."""
    asked: list[tuple[Any, ...]] = []
    monkeypatch.setattr(tasks.rescore_patient, "apply_async", lambda args, **_: asked.append(args))
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=1)))
    assert asked == [("p1", "subscription/sub-1")]

    def refused(args: Any, **_: Any) -> None:
        raise OperationalError("connection refused")
    monkeypatch.setattr(tasks.rescore_patient, "apply_async", refused)
    response = post(sc, notification("event-notification", [heart_rate("p2")], start=2))
    assert response.status_code == 503 and response.headers["Retry-After"] == "30"   # steers the redelivery
    monkeypatch.setattr(tasks.rescore_patient, "apply_async", lambda args, **_: asked.append(args))
    text = diagnostics(post(sc, notification("event-notification", [heart_rate("p2")], start=2)))   # the retry
    assert asked[-1] == ("p2", "subscription/sub-1") and "0 already queued" in text


@pytest.mark.parametrize("where, value", [("event-number", str(10 ** 17)), ("event-number", "-1"),
                                          ("events-since-subscription-start", str(2 ** 53 + 1))])
def test_an_event_number_out_of_range_is_a_malformed_notification(sc: FlaskClient, queued: list, where: str,
                                                                  value: str) -> None:
    bundle = notification("event-notification", [heart_rate("p1")], start=5)
    if where == "event-number":
        number = [p for p in bundle["entry"][0]["resource"]["parameter"] if p["name"] == "notification-event"]
        number[0]["part"][0]["valueString"] = value
    else:
        events_since_start(bundle)["valueString"] = value
    response = post(sc, bundle)
    assert response.status_code == 400, response.get_json()
    assert where in response.get_json()["issue"][0]["expression"][0]
    assert queued == []
    assert diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=6)))
    assert diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=2 ** 53)))


def test_a_failing_record_script_leaves_the_event_log_as_it_was(log_and_gate: Any) -> None:
    """A number Lua writes as '1e+17' (HINCRBY refuses it): the script fails before writing anything."""
    client, events, _ = log_and_gate
    assert events.record(event(5, "p1"), NOW) is None
    before = client.hgetall(events._key("sub-1"))
    huge = Notification("sub-1", "event-notification", events=[Event(str(10 ** 17), "Observation/x", None)])
    with pytest.raises(redis.ResponseError):
        events.record(huge, NOW + timedelta(minutes=1))
    assert client.hgetall(events._key("sub-1")) == before
    gap = events.record(event(7, "p1"), NOW + timedelta(minutes=2))
    assert gap is not None and gap.missed == 1 and gap.since == NOW - EventLog.MARGIN


def test_a_settle_after_the_claim_lapsed_changes_nothing(log_and_gate: Any) -> None:
    """A's catch-up outlives its lease; B takes it over and settles it; C finds a new gap and claims
    it; A finally settles: neither C's claim nor the gap C owes may go."""
    client, events, _ = log_and_gate
    lease = EventLog.LEASE
    events.record(event(1, "p1"), NOW)
    a = events.record(event(20, "p1"), NOW + timedelta(minutes=1))
    assert a is not None and a.missed == 18
    b = events.record(event(21, "p1"), NOW + lease + timedelta(minutes=2))
    assert b is not None
    events.settle("sub-1", b, done=True)
    c = events.record(event(25, "p1"), NOW + lease + timedelta(minutes=3))
    assert c is not None and c.missed == 3
    events.settle("sub-1", a, done=True)                           # A, late: nothing happens
    assert events.record(event(26, "p1"), NOW + lease + timedelta(minutes=4)) is None   # C still holds it
    events.settle("sub-1", c, done=False)                          # C's search failed: still owed
    d = events.record(event(27, "p1"), NOW + lease + timedelta(minutes=5))
    assert d is not None and d.missed == 3


def test_a_refused_notification_is_audited_without_its_secret(sub_app: Flask, sc: FlaskClient, queued: list) -> None:
    wrong = "wrong-" + SECRET
    assert post(sc, notification("heartbeat"), secret=wrong).status_code == 401          # screened out
    assert post(sc, notification("heartbeat", subscription="sub-1"), secret="other-secret").status_code == 401
    assert sc.post("/subscriptions/notify", json=notification("heartbeat")).status_code == 401    # the API token: no secret
    denials = [e["resource"] for e in sc.get("/AuditEvent?outcome=4").get_json().get("entry", [])]
    refused = [e for e in denials if "/subscriptions/notify" in e.get("outcomeDesc", "")]
    assert len(refused) == 3, denials
    for audit in refused:
        assert audit["outcome"] == "4" and audit["action"] == "C" and "401" in audit["outcomeDesc"]
        assert audit["agent"][0]["who"]["identifier"]["value"] == "anonymous"
        assert wrong not in str(audit) and "other-secret" not in str(audit) and SECRET not in str(audit)


def test_observations_that_are_not_valid_fhir_are_ignored_not_a_failure(log_and_gate: Any) -> None:
    """A subject that is a string, a category that is a string, a coding list that is an object: the
    hospital's server sent JSON that is not FHIR. Each is ignored; the notification still counts."""
    _, events, gate = log_and_gate
    good = heart_rate("p2")
    odd = [{**heart_rate("p1"), "subject": "Patient/p1"},
           {**heart_rate("p5"), "status": ["final"]},
           {**heart_rate("p6"), "category": [], "code": {"coding": [{"system": ["http://loinc.org"], "code": "8867-4"}]}},
           {**heart_rate("p3"), "category": "vital-signs", "code": {"coding": {"code": "8867-4"}}},
           {**heart_rate("p4"), "component": ["x"], "category": ["vital-signs"], "code": "8867-4"}]
    done: list[str] = []
    bundle = parse_notification(notification("event-notification", [*odd, good], start=1))
    out = handle(bundle, source=NoSearch(), codes=[("http://loinc.org", "8867-4")], debounce=gate,
                 enqueue=done.append, events=events, now=NOW)
    assert done == ["p2"] and out.ignored == 5


def test_a_catch_up_that_breaks_keeps_its_claim_instead_of_failing_every_notification(
        log_and_gate: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Something nobody foresaw breaks the catch-up search (not the queue): that notification fails,
    but the catch-up stays claimed until its lease runs out, so the notifications after it go through
    instead of each running the same broken search again."""
    _, events, gate = log_and_gate
    runs: list[datetime] = []

    def broken(_source: Any, since: datetime, _codes: Any, **_options: Any) -> list[str]:
        runs.append(since)
        raise AttributeError("'str' object has no attribute 'get'")
    monkeypatch.setattr(subscriptions, "catch_up", broken)
    done: list[str] = []
    handle(event(5, "p5"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events, now=NOW)
    with pytest.raises(AttributeError):
        handle(event(7, "p7"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events,
               now=NOW + timedelta(minutes=1))
    for n in (8, 9):
        handle(event(n, f"p{n}"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events,
               now=NOW + timedelta(minutes=n))
    assert len(runs) == 1 and done == ["p5", "p8", "p9"]


def test_the_same_notification_failing_twice_is_owed_once(log_and_gate: Any, searches: Any) -> None:
    """Event 6 cannot be queued, the hospital's server sends it again and it fails again: the catch-up
    owes one event (it said 2: each failure owed it again)."""
    _, events, gate = log_and_gate
    done: list[str] = []
    handle(event(5, "p5"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events, now=NOW)
    for minute in (1, 2):
        with pytest.raises(RuntimeError):
            handle(event(6, "p6"), source=NoSearch(), codes=[], debounce=gate, enqueue=broker_down, events=events,
                   now=NOW + timedelta(minutes=minute))
    searches.found[:] = ["p6"]
    out = handle(event(7, "p7"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events,
                 now=NOW + timedelta(minutes=3))
    assert out.missed == 1 and done == ["p5", "p6", "p7"]
    assert handle(event(8, "p8"), source=NoSearch(), codes=[], debounce=gate, enqueue=done.append, events=events,
                  now=NOW + timedelta(minutes=4)).missed == 0
    assert len(searches.since) == 2 and searches.since[0] == NOW - EventLog.MARGIN


def test_after_a_handshake_a_reused_event_number_that_fails_is_owed_again(log_and_gate: Any) -> None:
    """Event 6 fails and is owed; event 7's catch-up claims it. The subscription is re-created
    (handshake at 5) and the new event 6, another event, fails too: it is owed, so when 7's catch-up
    (which may have searched before it happened) settles, a catch-up is still owed."""
    _, events, _ = log_and_gate
    events.record(event(5, "p5"), NOW)
    events.record(event(6, "p6"), NOW + timedelta(minutes=1))
    events.owe(event(6, "p6"), NOW)
    claimed = events.record(event(7, "p7"), NOW + timedelta(minutes=2))
    assert claimed is not None and claimed.missed == 1
    handshake = parse_notification(notification("handshake"))
    handshake.events_since_start = "5"
    events.restart(handshake, NOW + timedelta(minutes=3))
    assert events.record(event(6, "p8"), NOW + timedelta(minutes=4)) is None       # claimed: 7's runs it
    events.owe(event(6, "p8"), NOW + timedelta(minutes=3))
    events.settle("sub-1", claimed, done=True)
    rest = events.record(event(7, "p9"), NOW + timedelta(minutes=5))
    assert rest is not None and rest.missed == 1
