"""Subscriptions: event numbering (older servers without event numbers, a re-created subscription,
numbers missing inside one notification, notifications at the same time), empty payloads, and the
secret checked before the body is read (real Redis)."""
from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import responses
from flask import Flask
from flask.testing import FlaskClient

from fhir_ai.fhir.times import format_datetime
from fhir_ai.subscriptions import Debouncer, EventLog, handle, parse_notification
from test_subscriptions import (BASE, NOW, SECRET, diagnostics, events_since_start, heart_rate,  # noqa: F401
                                notification, post, queued, redis_or_skip, sc, searchset, server_app, sub_app)


def older(count: int, resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A notification as older servers send it: the focus resources as entries, no notification-event
    parameters, only `events-since-subscription-start` (which counts this notification's events too)."""
    bundle = notification("event-notification", resources)
    status = bundle["entry"][0]["resource"]
    status["parameter"] = [p for p in status["parameter"] if p["name"] != "notification-event"]
    events_since_start(bundle)["valueString"] = str(count)
    return bundle


def renumber(bundle: dict[str, Any], numbers: list[int]) -> dict[str, Any]:
    events = [p for p in bundle["entry"][0]["resource"]["parameter"] if p["name"] == "notification-event"]
    for event, number in zip(events, numbers, strict=True):
        event["part"][0]["valueString"] = str(number)
    events_since_start(bundle)["valueString"] = str(max(numbers))
    return bundle


def empty(number: int) -> dict[str, Any]:
    """An `empty` payload: the event is numbered, but neither its focus nor a resource is sent."""
    bundle = notification("event-notification", [heart_rate("p0")], start=number, id_only=True)
    for p in bundle["entry"][0]["resource"]["parameter"]:
        if p["name"] == "notification-event":
            p["part"] = [q for q in p["part"] if q["name"] != "focus"]
    bundle["entry"] = bundle["entry"][:1]
    return bundle


def test_notifications_without_event_numbers_are_counted_from_events_since_start(sc: FlaskClient,
                                                                                 queued: list) -> None:
    assert "missed" not in diagnostics(post(sc, older(1, [heart_rate("p1")])))
    assert "missed" not in diagnostics(post(sc, older(2, [heart_rate("p2")])))           # event 2
    assert "missed" not in diagnostics(post(sc, older(4, [heart_rate("p3"), heart_rate("p4")])))   # 3 and 4
    beat = notification("heartbeat")
    events_since_start(beat)["valueString"] = "4"                                         # nothing since
    assert "missed" not in diagnostics(post(sc, beat))
    assert "2 event(s) missed" in diagnostics(post(sc, older(7, [heart_rate("p5")])))     # 5 and 6 lost
    events_since_start(beat)["valueString"] = "9"                                         # 8 and 9 lost
    assert "2 event(s) missed" in diagnostics(post(sc, beat))


def test_a_handshake_restarts_the_numbering(sc: FlaskClient, queued: list) -> None:
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=50)))
    diagnostics(post(sc, notification("handshake")))          # the subscription was created again: 0 events
    assert "missed" not in diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=1)))
    assert "1 event(s) missed" in diagnostics(post(sc, notification("event-notification", [heart_rate("p2")],
                                                                     start=3)))


def test_a_number_missing_inside_one_notification_is_a_gap(sc: FlaskClient, queued: list) -> None:
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=5)))
    text = diagnostics(post(sc, renumber(notification("event-notification", [heart_rate("p2"), heart_rate("p3")]),
                                         [6, 8])))
    assert "1 event(s) missed" in text


def test_out_of_order_numbers_are_missing_once_and_never_after_they_arrived(sc: FlaskClient, queued: list) -> None:
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=5)))
    assert "1 event(s) missed" in diagnostics(post(sc, notification("event-notification", [heart_rate("p2")],
                                                                     start=7)))
    assert "missed" not in diagnostics(post(sc, notification("event-notification", [heart_rate("p3")], start=6)))
    assert "missed" not in diagnostics(post(sc, notification("event-notification", [heart_rate("p4")], start=8)))
    assert [p for p, _ in queued] == ["p1", "p2", "p3", "p4"]


@responses.activate
def test_an_empty_payload_starts_the_catch_up_search(server_app: Flask, queued: list) -> None:
    sc = server_app.test_client()
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=1)))
    search = responses.get(f"{BASE}/Observation", json=searchset(heart_rate("p1"), heart_rate("p7")))
    text = diagnostics(post(sc, empty(2)))
    assert "1 event(s) missed or sent without" in text and "found 2 patient(s)" in text
    assert search.call_count == 1 and responses.calls[-1].request.params["_lastUpdated"].startswith("ge")
    assert [p for p, _ in queued] == ["p1", "p7"]              # p1 is already waiting: debounced
    assert "missed" not in diagnostics(post(sc, empty(2)))     # a repeated delivery is old news
    assert search.call_count == 1


class NoSearch:
    """A source that cannot be searched: a gap is reported and not retried."""


def test_notifications_at_the_same_time_report_a_gap_once_and_lose_no_advance() -> None:
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    gate = Debouncer(client, 0, "unused:")
    five = parse_notification(notification("event-notification", [heart_rate("p1")], start=5))
    eight = parse_notification(notification("event-notification", [heart_rate("p2")], start=8))
    outcomes: list[Any] = []
    start = threading.Barrier(8)

    def deliver(n: Any) -> None:
        start.wait()
        # queuing takes a while: a log checked before it and advanced after would be read by all eight
        outcomes.append(handle(n, source=NoSearch(), codes=[], debounce=gate, enqueue=lambda _: time.sleep(0.05),
                               events=events))
    try:
        handle(five, source=NoSearch(), codes=[], debounce=gate, enqueue=lambda _: None, events=events)
        threads = [threading.Thread(target=deliver, args=(eight,)) for _ in range(8)]   # the same delivery 8 times
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(o.missed for o in outcomes) == [0] * 7 + [2]
        later = [parse_notification(notification("event-notification", [heart_rate("p3")], start=n))
                 for n in range(9, 17)]
        start = threading.Barrier(8)
        threads = [threading.Thread(target=deliver, args=(n,)) for n in later]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert int(client.hget(events._key("sub-1"), "number")) == 16
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_a_caller_without_the_secret_is_refused_before_its_body_is_read(sc: FlaskClient, queued: list) -> None:
    response = sc.post("/subscriptions/notify", data=b'{"resourceType": "Bundle", "type": "hist',
                       content_type="application/fhir+json")
    assert response.status_code == 401
    response = sc.post("/subscriptions/notify", data=b"not json", content_type="application/fhir+json",
                       headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    # a secret that is configured, but for another subscription than the body names
    response = post(sc, notification("heartbeat", subscription="sub-1"), secret="other-secret")
    assert response.status_code == 401
    response = sc.post("/subscriptions/notify", data=b"not json", content_type="application/fhir+json",
                       headers={"Authorization": f"Bearer {SECRET}"})
    assert response.status_code == 400


def happened(bundle: dict[str, Any], instant: datetime | None) -> dict[str, Any]:
    """Each event of the notification says it happened at ``instant`` (None: says nothing)."""
    for p in bundle["entry"][0]["resource"]["parameter"]:
        if p["name"] == "notification-event":
            p["part"] = [q for q in p["part"] if q["name"] != "timestamp"]
            if instant is not None:
                p["part"].insert(1, {"name": "timestamp", "valueInstant": format_datetime(instant)})
    return bundle


def numbered(number: int, patient: str, instant: datetime | None) -> Any:
    return parse_notification(happened(notification("event-notification", [heart_rate(patient)], start=number),
                                       instant))


@responses.activate
def test_numbers_that_restart_without_a_handshake_are_a_restart_not_old_news(server_app: Flask,
                                                                             queued: list) -> None:
    """The hospital's server re-created the subscription without a handshake: after event 50, event 1
    comes, and it happened after event 50. Before, it and the 49 numbers after it were taken as old
    ones: no gap in them was ever seen, and what changed in between was never caught up."""
    sc = server_app.test_client()
    now = datetime.now(timezone.utc)
    search = responses.get(f"{BASE}/Observation", json=searchset(heart_rate("p9")))
    diagnostics(post(sc, happened(notification("event-notification", [heart_rate("p1")], start=50),
                                  now - timedelta(minutes=30))))
    text = diagnostics(post(sc, happened(notification("event-notification", [heart_rate("p2")], start=1), now)))
    assert "restarted without a handshake" in text and "1 event(s) missed" in text and "found 1 patient(s)" in text
    assert search.call_count == 1
    text = diagnostics(post(sc, happened(notification("event-notification", [heart_rate("p3")], start=3), now)))
    assert "1 event(s) missed" in text and "restarted" not in text        # 2 is lost: a gap in the new numbering
    assert [p for p, _ in queued] == ["p1", "p9", "p2", "p3"]      # the catch-up's patients first


def test_a_repeat_is_no_restart_whatever_the_clocks() -> None:
    """Event 5 says it happened an hour ahead of our clock (the hospital's clock is off): delivered
    again later, and event 4 late (even saying it happened a little after 5: events numbered close
    together), they are old news, not a restart. Event 1 happening well after event 5 is one: owed
    from when event 5 was seen."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    ahead = NOW + timedelta(hours=1)
    try:
        assert events.enter(numbered(5, "p5", ahead), NOW) == (None, None, False)
        assert events.enter(numbered(5, "p5", ahead), NOW + timedelta(minutes=2))[1:] == (NOW, False)
        assert events.enter(numbered(4, "p4", ahead + timedelta(seconds=2)), NOW + timedelta(minutes=3))[2] is False
        gap, previous, restarted = events.enter(numbered(1, "p1", ahead + EventLog.MARGIN + timedelta(seconds=1)),
                                                NOW + timedelta(minutes=4))
        assert restarted and previous == NOW and gap is not None and gap.since == NOW - EventLog.MARGIN
        assert gap.missed == 1
        events.settle("sub-1", gap, done=True)
        assert events.enter(numbered(2, "p2", ahead + EventLog.MARGIN + timedelta(seconds=2)),
                            NOW + timedelta(minutes=5)) == (None, NOW + timedelta(minutes=4), False)
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_without_an_event_time_seen_a_restart_is_told_by_our_clock_with_a_margin() -> None:
    """Event 5 said nothing of when it happened: event 1 is a restart only if it happened more than the
    clocks' margin after event 5 was seen."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    try:
        events.enter(numbered(5, "p5", None), NOW)
        assert events.enter(numbered(1, "p1", None), NOW + timedelta(hours=1))[2] is False    # it says nothing
        assert events.enter(numbered(1, "p1", NOW + EventLog.MARGIN), NOW + timedelta(hours=1))[2] is False
        gap, _, restarted = events.enter(numbered(1, "p1", NOW + EventLog.MARGIN + timedelta(seconds=1)),
                                         NOW + timedelta(hours=1))
        assert restarted and gap is not None and gap.since == NOW - EventLog.MARGIN
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_a_restart_is_told_with_its_first_event_dated_after_the_last_ones() -> None:
    """After event 50, the new numbering's events come 4 s apart, the first 30 s after event 50 (a busy
    subscription re-created): told with event 1, not after MARGIN - by then its numbers would have
    passed 50 and looked like the old ones going on, and event 20, lost, would never be caught up. Nor
    would 49 and 50, lost just before 51."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    try:
        events.enter(numbered(50, "p50", NOW), NOW)
        told = {}
        for n in [n for n in range(1, 53) if n not in (20, 49, 50)]:     # those lost
            when = NOW + EventLog.REORDER + timedelta(seconds=4 * n)
            gap, _, restarted = events.enter(numbered(n, f"q{n}", when), when)
            if gap is not None or restarted:
                told[n] = (gap.missed if gap else 0, restarted)
                if gap is not None:
                    events.settle("sub-1", gap, done=True)
        assert told == {1: (1, True), 21: (1, False), 51: (2, False)}
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_a_late_delivery_dated_a_little_after_a_later_event_is_old_news() -> None:
    """Event 9 delivered after 10, saying it happened up to REORDER after it: old news. Dated later than
    that, it is taken as a restart (a catch-up: nothing lost if it was not one)."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    try:
        events.enter(numbered(10, "p10", NOW), NOW)
        later = NOW + timedelta(minutes=1)
        assert events.enter(numbered(9, "p9", NOW + EventLog.REORDER), later)[2] is False
        assert events.enter(numbered(10, "p10", NOW), later)[2] is False                   # a repeat
        assert events.enter(numbered(9, "p9", NOW + EventLog.REORDER + timedelta(seconds=1)), later)[2] is True
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_one_event_dated_in_the_future_does_not_hide_the_restarts_after_it() -> None:
    """Event 6 says it happened a day ahead (a bad clock, once): event 7, dated right again, replaces
    its time; two hours later the numbering restarts without a handshake: told. Before, the time kept
    was the latest ever said: no restart was told for a day."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    try:
        events.enter(numbered(5, "p5", NOW), NOW)
        events.enter(numbered(6, "p6", NOW + timedelta(days=1)), NOW + timedelta(minutes=1))
        events.enter(numbered(7, "p7", NOW + timedelta(minutes=2)), NOW + timedelta(minutes=2))
        when = NOW + timedelta(hours=2)
        gap, _, restarted = events.enter(numbered(1, "q1", when), when)
        assert restarted and gap is not None
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_a_handshake_forgets_when_the_last_event_happened() -> None:
    """Event 5 was dated a day ahead; then a handshake (5 events so far). An hour later, event 1: the
    numbering restarted again without one - told (compared with when the handshake came, our clock),
    not hidden by event 5's date from before the handshake."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    try:
        events.enter(numbered(5, "p5", NOW + timedelta(days=1)), NOW)
        handshake = notification("handshake")
        events_since_start(handshake)["valueString"] = "5"
        events.restart(parse_notification(handshake), NOW + timedelta(minutes=1))
        when = NOW + timedelta(hours=1)
        assert events.enter(numbered(1, "q1", when), when)[2] is True
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])
