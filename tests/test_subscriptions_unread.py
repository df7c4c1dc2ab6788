"""Subscriptions: an id-only event whose focus cannot be read from the hospital's server (real Redis,
the server mocked with responses). For now (503, no connection): owed to the catch-up search, which
runs until it succeeds. Gone (404): ignored, no catch-up."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import requests
import responses
from flask import Flask

from fhir_ai.fhir.times import parse_datetime
from fhir_ai.subscriptions import EventLog, parse_notification
from test_subscriptions import (BASE, NOW, diagnostics, events_since_start, heart_rate, notification,  # noqa: F401
                                post, queued, redis_or_skip, searchset, server_app)

FAILURES = {
    "503": {"status": 503, "json": {"resourceType": "OperationOutcome",
                                    "issue": [{"severity": "error", "code": "transient"}]}},
    "no connection": {"body": requests.ConnectionError("refused")},
    "no answer in time": {"body": requests.ReadTimeout("slow")},
    "an empty 200": {"status": 200, "body": ""},     # an answer cut before its first byte, or a proxy
}


def happened(bundle: dict[str, Any], when: datetime) -> dict[str, Any]:
    """The notification's events happened at ``when`` (their `timestamp`)."""
    for p in bundle["entry"][0]["resource"]["parameter"]:
        if p["name"] == "notification-event":
            p["part"][1]["valueInstant"] = when.isoformat()
    return bundle


def no_waiting(app: Flask) -> None:
    """The client still makes all its attempts, without sleeping between them."""
    app.extensions["fhir_ai"].source.client._sleep = lambda _: None


@responses.activate
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_focus_that_cannot_be_read_for_now_is_caught_up_later(server_app: Flask, queued: list,
                                                                 failure: str) -> None:
    no_waiting(server_app)
    sc = server_app.test_client()
    seen = datetime.now(timezone.utc)
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=1)))
    vital = heart_rate("p5")
    read = responses.get(f"{BASE}/Observation/{vital['id']}", **FAILURES[failure])
    search = responses.get(f"{BASE}/Observation", **FAILURES[failure])      # the server is down for searches too
    text = diagnostics(post(sc, happened(notification("event-notification", [vital], id_only=True, start=2),
                                         datetime.now(timezone.utc))))
    assert read.call_count == 1 + server_app.config["FHIR_AI"].source_retries      # the client's retries
    assert "1 event(s) whose focus could not be read" in text and "catch-up" in text
    assert "catch-up search failed" in text and "tried again" in text
    assert search.call_count >= 1
    # the window opens when event 1 was seen (less the margin): it covers the Observation of event 2
    since = parse_datetime(responses.calls[-1].request.params["_lastUpdated"][2:])
    assert seen - EventLog.MARGIN - timedelta(seconds=1) <= since <= seen - EventLog.MARGIN + timedelta(seconds=5)
    assert [p for p, _ in queued] == ["p1"]
    # the server is back; the next heartbeat (nothing new since event 2) runs the catch-up owed
    responses.replace(responses.GET, f"{BASE}/Observation", json=searchset(vital))
    beat = notification("heartbeat")
    events_since_start(beat)["valueString"] = "2"
    text = diagnostics(post(sc, beat))
    assert "found 1 patient(s)" in text
    assert [p for p, _ in queued] == ["p1", "p5"]
    assert "missed" not in diagnostics(post(sc, beat))                        # settled: no search again


@responses.activate
def test_a_focus_that_is_gone_is_ignored_without_a_catch_up(server_app: Flask, queued: list) -> None:
    no_waiting(server_app)
    sc = server_app.test_client()
    diagnostics(post(sc, notification("event-notification", [heart_rate("p1")], start=1)))
    gone = heart_rate("p5")
    read = responses.get(f"{BASE}/Observation/{gone['id']}", status=404, json={
        "resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
    search = responses.get(f"{BASE}/Observation", json=searchset())
    text = diagnostics(post(sc, notification("event-notification", [gone], id_only=True, start=2)))
    assert read.call_count == 1                                               # not retried
    assert "1 ignored" in text and "not found at the hospital" in text
    assert "missed" not in text and "could not be read" not in text
    assert search.call_count == 0 and [p for p, _ in queued] == ["p1"]
    beat = notification("heartbeat")
    events_since_start(beat)["valueString"] = "2"
    assert "missed" not in diagnostics(post(sc, beat))
    assert search.call_count == 0


def test_the_event_log_counts_an_unread_focus_as_missed() -> None:
    """Also in the first notification seen, and from a server that numbers no events and sends no count."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")
    try:
        two = parse_notification(notification("event-notification", [heart_rate("p1"), heart_rate("p2")],
                                               id_only=True, start=1))
        gap = events.record(two, NOW, unread=[1])
        assert gap is not None and gap.missed == 1 and gap.since == NOW - EventLog.MARGIN
        events.settle("sub-1", gap, done=True)
        assert events.record(two, NOW, unread=[1]) is None          # a repeated delivery: old numbers
        bare = notification("event-notification", [heart_rate("p3")], id_only=True, subscription="sub-2")
        status = bare["entry"][0]["resource"]
        status["parameter"] = [p for p in status["parameter"]
                               if p["name"] not in ("notification-event", "events-since-subscription-start")]
        assert events.record(parse_notification(bare), NOW) is None
        gap = events.record(parse_notification(bare), NOW, unread=[0])
        assert gap is not None and gap.missed == 1
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])


def test_the_catch_up_window_opens_by_the_unread_events_time_when_it_came_late() -> None:
    """The hospital's server delivered event 1 ten minutes late (a backlog), then event 2, whose focus
    could not be read: its Observation changed when the event happened (its `timestamp`), before the
    time event 1 was seen less the margin. The window opens by that time (never more than OPENING back)."""
    client = redis_or_skip()
    events = EventLog(client, f"fhir_ai:test-{uuid.uuid4().hex[:8]}:subscription:")

    def at(number: int, when: datetime) -> Any:
        return parse_notification(happened(notification("event-notification", [heart_rate("p1")], id_only=True,
                                                        start=number), when))
    try:
        late = NOW + timedelta(minutes=10)
        assert events.record(at(1, NOW), late) is None
        gap = events.record(at(2, NOW + timedelta(seconds=1)), late + timedelta(seconds=1), unread=[0])
        assert gap is not None and gap.since == NOW + timedelta(seconds=1) - EventLog.MARGIN
        events.settle("sub-1", gap, done=True)
        gap = events.record(at(3, NOW - timedelta(days=30)), late + timedelta(seconds=2), unread=[0])
        assert gap is not None and gap.since == late + timedelta(seconds=2) - EventLog.OPENING - EventLog.MARGIN
    finally:
        client.delete(*client.keys(f"{events.prefix}*") or ["-"])
