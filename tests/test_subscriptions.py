"""Subscriptions (R4 backport, rest-hook): handshake, heartbeat, id-only and full-resource event
notifications, the shared secret per subscription, and debounced rescoring (real Redis keys)."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
import responses
from flask import Flask
from flask.testing import FlaskClient

from factories import observation
from fhir_ai.app import create_app
from fhir_ai.jobs import runtime, tasks
from fhir_ai.jobs.celery_app import app as celery
from fhir_ai.subscriptions import Debouncer, EventLog, debouncer, is_vital_sign, parse_notification

BASE = "https://ehr.example.org/fhir"
SECRET = "s3cret-for-sub-1"
TOPIC = "http://hl7.org/fhir/us/core/SubscriptionTopic/observation-create"
NOW = datetime(2026, 11, 20, 8, 0, tzinfo=timezone.utc)


def redis_or_skip(url: str = "redis://127.0.0.1:6379/0") -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        if os.environ.get("CI"):
            pytest.fail("Redis is not running at 127.0.0.1:6379 (.ci/run starts it)")
        pytest.skip("Redis is not running at 127.0.0.1:6379")
    return client


def status(kind: str, events: list[tuple[int, str]] = (), subscription: str = "sub-1") -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{BASE}/Subscription/{subscription}"}},
        {"name": "topic", "valueCanonical": TOPIC},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": str(max([n for n, _ in events], default=0))},
    ]
    for number, focus in events:
        params.append({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": str(number)},
            {"name": "timestamp", "valueInstant": "2026-11-20T08:00:00Z"},
            {"name": "focus", "valueReference": {"reference": focus}}]})
    return {"resourceType": "Parameters", "parameter": params}



def events_since_start(bundle: dict[str, Any]) -> dict[str, Any]:
    """The status parameter 'events-since-subscription-start' of a notification Bundle (found by name)."""
    (parameter,) = [p for p in bundle["entry"][0]["resource"]["parameter"]
                    if p["name"] == "events-since-subscription-start"]
    return parameter

def notification(kind: str, resources: list[dict[str, Any]] = (), *, id_only: bool = False, start: int = 1,
                 subscription: str = "sub-1") -> dict[str, Any]:
    events = [(start + i, f"{BASE}/Observation/{r['id']}") for i, r in enumerate(resources)]
    entries: list[dict[str, Any]] = [{"fullUrl": "urn:uuid:" + uuid.uuid4().hex,
                                      "resource": status(kind, events, subscription)}]
    for resource in resources:
        entry: dict[str, Any] = {"fullUrl": f"{BASE}/Observation/{resource['id']}",
                                 "request": {"method": "POST", "url": "Observation"},
                                 "response": {"status": "201"}}
        if not id_only:
            entry["resource"] = resource
        entries.append(entry)
    return {"resourceType": "Bundle", "type": "history", "timestamp": "2026-11-20T08:00:01Z", "entry": entries}


def heart_rate(patient_id: str, value: float = 120) -> dict[str, Any]:
    return observation(patient_id, "8867-4", value, "/min", NOW)


def hba1c(patient_id: str) -> dict[str, Any]:
    """A laboratory value no model reads (HbA1c)."""
    return observation(patient_id, "4548-4", 6.1, "%", NOW, category=[
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}])


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """Rescoring tasks queued (patient, countdown) instead of sent to the broker."""
    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(tasks.rescore_patient, "apply_async",
                        lambda args, countdown=None, **_: calls.append((args[0], countdown)))
    return calls


def close(app: Flask) -> None:
    """Drop the test's Redis keys (debounce, event log) and close the app."""
    settings = app.config["FHIR_AI"]
    keys = debouncer(settings).client.keys(f"fhir_ai:{settings.job_queue}:*")
    if keys:
        debouncer(settings).client.delete(*keys)
    app.extensions["fhir_ai"].close()


@pytest.fixture
def sub_app(settings_overrides: dict[str, Any]) -> Iterator[Flask]:
    redis_or_skip()
    settings_overrides.update(subscription_secrets=f"sub-1={SECRET}, sub-2=other-secret",
                              job_queue=f"test-{uuid.uuid4().hex[:8]}", rescore_debounce=30.0)
    app = create_app(settings_overrides)
    yield app
    close(app)


@pytest.fixture
def sc(sub_app: Flask) -> FlaskClient:
    return sub_app.test_client()


def post(sc: FlaskClient, bundle: dict[str, Any], secret: str | None = SECRET) -> Any:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {"Authorization": ""}
    return sc.post("/subscriptions/notify", json=bundle, headers=headers)


def test_handshake_and_heartbeat_are_acknowledged_without_work(sc: FlaskClient, queued: list) -> None:
    for kind in ("handshake", "heartbeat"):
        response = post(sc, notification(kind))
        assert response.status_code == 200
        assert kind in response.get_json()["issue"][0]["diagnostics"]
    assert queued == []


@pytest.mark.parametrize("secret, subscription", [(None, "sub-1"), ("wrong", "sub-1"), (SECRET, "sub-2"),
                                                  (SECRET, "sub-unknown")])
def test_a_notification_without_its_subscriptions_secret_is_refused(sc: FlaskClient, queued: list,
                                                                    secret: str | None, subscription: str) -> None:
    response = post(sc, notification("event-notification", [heart_rate("p1")], subscription=subscription),
                    secret=secret)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")       # says how to authenticate
    assert queued == []


def test_the_secret_may_come_in_its_own_header(sc: FlaskClient, queued: list) -> None:
    response = sc.post("/subscriptions/notify", json=notification("heartbeat"),
                       headers={"Authorization": "", "X-Subscription-Secret": SECRET})
    assert response.status_code == 200


def test_full_resource_burst_for_one_patient_costs_one_rescoring(sc: FlaskClient, queued: list) -> None:
    for n in range(5):   # five notifications, one per new heart rate, within the debounce window
        response = post(sc, notification("event-notification", [heart_rate("p1", 100 + n)], start=n + 1))
        assert response.status_code == 200
    assert queued == [("p1", 30.0)]
    # several patients in one notification: one each; a lab value no model reads is ignored
    post(sc, notification("event-notification", [heart_rate("p2"), heart_rate("p2", 130), heart_rate("p1"),
                                                 hba1c("p3")], start=6))
    assert queued == [("p1", 30.0), ("p2", 30.0)]


def test_when_the_rescoring_has_started_a_new_observation_queues_another(sub_app: Flask, sc: FlaskClient,
                                                                         queued: list) -> None:
    post(sc, notification("event-notification", [heart_rate("p1")]))
    debouncer(sub_app.config["FHIR_AI"]).release("p1")     # what rescore_patient does first
    post(sc, notification("event-notification", [heart_rate("p1", 140)], start=2))
    assert [p for p, _ in queued] == ["p1", "p1"]


@responses.activate
def test_id_only_notifications_read_the_observation_from_the_hospital(settings_overrides: dict[str, Any],
                                                                      queued: list) -> None:
    redis_or_skip()
    settings_overrides.update(source_url=BASE, subscription_secrets=f"sub-1={SECRET}",
                              job_queue=f"test-{uuid.uuid4().hex[:8]}")
    app = create_app(settings_overrides)
    try:
        vital, lab = heart_rate("p7"), hba1c("p8")
        responses.get(f"{BASE}/Observation/{vital['id']}", json=vital)
        responses.get(f"{BASE}/Observation/{lab['id']}", json=lab)
        gone = heart_rate("p9")
        responses.get(f"{BASE}/Observation/{gone['id']}", status=404,
                      json={"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
        response = post(app.test_client(), notification("event-notification", [vital, lab, gone], id_only=True))
        assert response.status_code == 200
        assert "1 patient(s)" in response.get_json()["issue"][0]["diagnostics"]
        assert [p for p, _ in queued] == ["p7"]
        assert len(responses.calls) == 3
    finally:
        settings = app.config["FHIR_AI"]
        debouncer(settings).release("p7")
        app.extensions["fhir_ai"].close()


@pytest.fixture
def server_app(settings_overrides: dict[str, Any]) -> Iterator[Flask]:
    """The hospital is a FHIR server (mocked with responses): id-only reads and catch-up searches go there."""
    redis_or_skip()
    settings_overrides.update(source_url=BASE, subscription_secrets=f"sub-1={SECRET}",
                              job_queue=f"test-{uuid.uuid4().hex[:8]}")
    app = create_app(settings_overrides)
    yield app
    close(app)


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset",
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}


def diagnostics(response: Any) -> str:
    assert response.status_code == 200, response.get_json()
    return response.get_json()["issue"][0]["diagnostics"]


@responses.activate
def test_missed_events_start_a_catch_up_search_for_changed_vital_signs(server_app: Flask, queued: list) -> None:
    sc = server_app.test_client()
    assert "missed" not in diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=1)))
    # events 2-4 never arrive (the hospital's server gave up on them); event 5 does
    catch_up = responses.get(f"{BASE}/Observation", json=searchset(heart_rate("p7"), hba1c("p8"), heart_rate("p1")))
    text = diagnostics(post(sc, notification("event-notification", [heart_rate("p2")], start=5)))
    assert "3 event(s) missed" in text and "found 2 patient(s)" in text
    assert catch_up.call_count == 1
    query = responses.calls[-1].request.params
    assert query["_lastUpdated"].startswith("ge") and "code" not in query
    assert sorted(p for p, _ in queued) == ["p1", "p2", "p7"]     # p1 was already queued: debounced, not twice
    # late or repeated deliveries of old numbers are no gap
    assert "missed" not in diagnostics(post(sc, notification("event-notification", [heart_rate("p3")], start=3)))
    assert "missed" not in diagnostics(post(sc, notification("event-notification", [heart_rate("p3")], start=6)))
    assert catch_up.call_count == 1


@responses.activate
def test_a_heartbeat_reveals_missed_events_and_a_failed_catch_up_is_tried_again(server_app: Flask,
                                                                                queued: list) -> None:
    sc = server_app.test_client()
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=1)))
    broken = responses.get(f"{BASE}/Observation", status=500, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "exception"}]})
    beat = notification("heartbeat")
    events_since_start(beat)["valueString"] = "3"                          # 3 events so far; we saw 1
    text = diagnostics(post(sc, beat))
    assert "2 event(s) missed" in text and "catch-up search failed" in text
    assert broken.call_count >= 1
    responses.replace(responses.GET, f"{BASE}/Observation", json=searchset(heart_rate("p9")))
    text = diagnostics(post(sc, beat))                                      # the same gap, tried again
    assert "2 event(s) missed" in text and "found 1 patient(s)" in text
    assert [p for p, _ in queued] == ["p1", "p9"]
    assert "missed" not in diagnostics(post(sc, beat))                      # caught up: no gap any more


def test_missed_events_a_folder_source_cannot_catch_up_are_reported_once(sc: FlaskClient, queued: list) -> None:
    """No FHIR server to search: the gap is said, not retried (which would report it with every notification)."""
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=1)))
    text = diagnostics(post(sc, notification("event-notification", [heart_rate("p2")], start=5)))
    assert "3 event(s) missed" in text and "catch-up search failed" in text and "tried again" not in text
    assert "missed" not in diagnostics(post(sc, notification("event-notification", [heart_rate("p3")], start=6)))
    assert [p for p, _ in queued] == ["p1", "p2", "p3"]

def test_id_only_events_a_folder_source_cannot_read_are_said_in_the_answer(sc: FlaskClient, queued: list) -> None:
    """A folder source (the demo) cannot read one Observation: an id-only event is not silently 'ignored'
    like a lab value; the answer says why and what to do."""
    text = diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], id_only=True)))
    assert "1 id-only event(s) not read: the configured source is a folder" in text
    assert queued == []
    full = diagnostics(post(sc, notification("event-notification", [heart_rate("p2")], start=2)))
    assert "id-only" not in full


def test_a_late_delivery_of_older_events_does_not_move_the_catch_up_window() -> None:
    """Events 6-7 lost, then event 3 redelivered an hour later, then event 8: the catch-up still
    searches from when event 5 was seen, not from the late delivery (which would skip 6-7)."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    try:
        assert events.record(parse_notification(notification("event-notification", [heart_rate("p1")], start=5)),
                             NOW) is None
        late = parse_notification(notification("event-notification", [heart_rate("p2")], start=3))
        assert events.record(late, NOW + timedelta(hours=1)) is None
        gap = events.record(parse_notification(notification("event-notification", [heart_rate("p3")], start=8)),
                            NOW + timedelta(hours=2))
        assert gap is not None and gap.missed == 2 and gap.since == NOW - EventLog.MARGIN
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_only_a_new_event_number_or_a_heartbeat_moves_when_the_subscription_was_last_seen() -> None:
    """Event 5 seen, then redelivered an hour later (nothing new): a later gap is still searched from
    when event 5 was first seen. A heartbeat counting 5 says nothing came since: the window moves to it."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    try:
        for subscription, heartbeat in (("sub-1", False), ("sub-2", True)):
            five = notification("event-notification", [heart_rate("p1")], start=5, subscription=subscription)
            events.record(parse_notification(five), NOW)
            assert events.record(parse_notification(five), NOW + timedelta(hours=1)) is None
            if heartbeat:
                beat = notification("heartbeat", subscription=subscription)
                events_since_start(beat)["valueString"] = "5"
                assert events.record(parse_notification(beat), NOW + timedelta(hours=2)) is None
            eight = notification("event-notification", [heart_rate("p3")], start=8, subscription=subscription)
            gap = events.record(parse_notification(eight), NOW + timedelta(hours=3))
            assert gap is not None and gap.missed == 2
            assert gap.since == (NOW + timedelta(hours=2) if heartbeat else NOW) - EventLog.MARGIN
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_a_catch_up_is_owed_until_it_ran_and_run_by_one_notification_at_a_time() -> None:
    """Gap found: the notification that runs the catch-up claims it; if the search fails the next
    notification gets it (with any newer gap added); once one ran, it is settled."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")

    def at(number: int, minute: int) -> Any:         # event `number` arrives at NOW + `minute` minutes
        n = parse_notification(notification("event-notification", [heart_rate("p1")], start=number))
        return events.record(n, NOW + timedelta(minutes=minute))
    try:
        at(1, 0)
        gap = at(3, 1)                                  # 2 lost
        assert gap is not None and gap.missed == 1
        assert at(4, 2) is None                         # claimed: the first one is running it
        events.settle("sub-1", gap, done=False)         # its search failed
        again = at(6, 3)                                # 5 lost as well: one catch-up from when 1 was seen
        assert again is not None and again.missed == 2 and again.since == NOW - EventLog.MARGIN
        events.settle("sub-1", again, done=True)
        assert at(7, 4) is None
        later = at(9, 5)                                # 8 lost: the window starts when 7 was seen
        assert later is not None and later.missed == 1
        assert later.since == NOW + timedelta(minutes=4) - EventLog.MARGIN
        assert at(11, 6) is None                        # 10 lost while that catch-up runs: owed
        events.settle("sub-1", later, done=True)
        rest = at(12, 7)
        assert rest is not None and rest.missed == 1    # still from 7's time: a wider window, never a narrower one
        assert rest.since == NOW + timedelta(minutes=4) - EventLog.MARGIN
        assert at(14, 8) is None                        # 13 lost; `rest` never settles (its process died) ...
        lapsed = at(15, 7 + int(EventLog.LEASE.total_seconds() // 60) + 1)
        assert lapsed is not None and lapsed.missed == 2    # ... so once its claim lapses, the next one runs it
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


@pytest.mark.parametrize("bundle, where", [
    ({"resourceType": "Bundle", "type": "collection", "entry": []}, "Bundle.type"),
    ({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient"}}]},
     "Bundle.entry[0].resource"),
])
def test_a_malformed_notification_is_400(sc: FlaskClient, bundle: dict[str, Any], where: str) -> None:
    response = post(sc, bundle)
    assert response.status_code == 400
    assert response.get_json()["issue"][0]["expression"] == [where]


def test_notification_parsing_without_notification_event_parameters() -> None:
    vital = heart_rate("p1")
    bundle = notification("event-notification", [vital])
    bundle["entry"][0]["resource"]["parameter"] = [p for p in bundle["entry"][0]["resource"]["parameter"]
                                                   if p["name"] != "notification-event"]
    parsed = parse_notification(bundle)
    assert parsed.subscription == "sub-1" and parsed.topic == TOPIC and parsed.events_since_start == "1"
    assert [(e.focus, e.resource["id"]) for e in parsed.events] == [(f"Observation/{vital['id']}", vital["id"])]


def test_vital_signs_are_recognised_by_category_or_by_the_mappings_codes() -> None:
    codes = [("http://loinc.org", "8867-4"), ("", "local-hr")]
    assert is_vital_sign(heart_rate("p"), [])
    assert is_vital_sign(observation("p", "local-hr", 80, "/min", NOW, category=[]), codes)
    assert not is_vital_sign(hba1c("p"), codes)
    assert not is_vital_sign({**heart_rate("p"), "status": "registered"}, codes)
    bp = observation("p", "85354-9", 0, "", NOW, category=[], valueQuantity=None,
                     component=[{"code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}])
    assert is_vital_sign(bp, codes)


def test_the_debounce_key_expires_by_itself() -> None:
    client = redis_or_skip()
    gate = Debouncer(client, 0.2, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:rescore:")
    assert gate.claim("p1") and not gate.claim("p1")
    assert 0 < client.pttl(gate.key("p1")) <= 200
    import time
    time.sleep(0.3)
    assert gate.claim("p1")
    gate.release("p1")
    assert Debouncer(client, 0, "x:").claim("p1") and Debouncer(client, 0, "x:").claim("p1")   # no debounce


def test_the_rescoring_task_releases_the_key_and_stores_an_assessment(sub_app: Flask) -> None:
    settings = sub_app.config["FHIR_AI"]
    runtime.configure(settings, sub_app.extensions["fhir_ai"])
    gate = debouncer(settings)
    assert gate.claim("demo-004")
    saved = celery.conf.task_always_eager
    celery.conf.task_always_eager = True
    try:
        ids = tasks.rescore_patient.delay("demo-004").get()
    finally:
        celery.conf.task_always_eager = saved
        runtime.close()
    assert len(ids) == 2
    assert gate.claim("demo-004")       # released: the next observation queues a new rescoring
    assert sub_app.extensions["fhir_ai"].store.get_assessment(ids[0])["subject"]["reference"] == "Patient/demo-004"
