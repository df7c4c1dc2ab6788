"""Subscriptions: a catch-up window longer than one search may read (more than CATCH_UP_PAGES pages)
is continued from where it stopped with the next notifications, never lost (real Redis; the
hospital's server mocked with responses, paging by offset)."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import responses
from flask import Flask

from fhir_ai.fhir.client import FhirClient
from fhir_ai.fhir.sources import ServerSource
from fhir_ai.fhir.times import format_datetime, parse_datetime
from fhir_ai.errors import UpstreamError
from fhir_ai.subscriptions import CATCH_UP_PAGES, ONE_INSTANT_PAGES, EventLog, catch_up, handle, parse_notification
from test_subscriptions import (BASE, NOW, diagnostics, heart_rate, notification, post, queued,  # noqa: F401
                                server_app)
from test_subscriptions_failures import broker_down, log_and_gate  # noqa: F401

PAGE = 2     # Observations per page: the fake server's own page size (it ignores _count, as servers may)


class Hospital:
    """Observations changed one a minute from ``start`` on, one patient each; searched by
    ``_lastUpdated=ge`` (and ``lt``), sorted by ``_lastUpdated`` unless ``sorts`` is off, paged by an
    offset; ``_summary=count`` answered with the total unless ``counts`` is off (then ignored)."""

    def __init__(self, count: int, sorts: bool = True, start: datetime = NOW - timedelta(hours=2),
                 refuses_sort: bool = False, counts: bool | int = True, created_order: bool = False) -> None:
        # counts: True answers the total, False ignores _summary, an int is the status refusing it.
        # created_order: unsorted answers come in the order the Observations were made, not some other.
        self.sorts, self.refuses_sort, self.counts, self.created_order = sorts, refuses_sort, counts, created_order
        self.observations = []
        for i in range(count):
            obs = heart_rate(f"p{i:03d}")
            obs["meta"] = {"lastUpdated": format_datetime(start + timedelta(minutes=i))}
            self.observations.append(obs)
        self.searched_from: list[str] = []
        self.windows: list[tuple[str, str | None]] = []     # (ge, lt) of each search read (not counted)
        self.pages = 0
        self.counted = 0
        self.sorted_asked = 0

    def __call__(self, request: Any) -> tuple[int, dict[str, str], str]:
        pairs = parse_qsl(urlsplit(request.url).query)
        query = dict(pairs)
        self.sorted_asked += "_sort" in query and "_offset" not in query
        if type(self.counts) is int and query.get("_summary") == "count":
            return self.counts, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-supported", "diagnostics": "_summary is not supported"}]})
        if self.refuses_sort and "_sort" in query:
            return 400, {}, json.dumps({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-supported", "diagnostics": "_sort is not supported"}]})
        bounds = [v for k, v in pairs if k == "_lastUpdated"]
        since = parse_datetime(next(v for v in bounds if v.startswith("ge"))[2:])
        before = next((parse_datetime(v[2:]) for v in bounds if v.startswith("lt")), None)
        found = [o for o in self.observations if parse_datetime(o["meta"]["lastUpdated"]) >= since
                 and (before is None or parse_datetime(o["meta"]["lastUpdated"]) < before)]
        if self.counts is True and query.get("_summary") == "count":
            self.counted += 1
            return 200, {"Content-Type": "application/fhir+json"}, json.dumps(
                {"resourceType": "Bundle", "type": "searchset", "total": len(found)})
        offset = int(query.pop("_offset", 0))
        if not offset:
            self.searched_from.append(next(v for v in bounds if v.startswith("ge")))
            self.windows.append((bounds[0], next((v for v in bounds if v.startswith("lt")), None)))
        if self.sorts and query.get("_sort") == "_lastUpdated":
            found.sort(key=lambda o: o["meta"]["lastUpdated"])
        elif self.created_order:
            found.sort(key=lambda o: self.observations.index(o))
        else:
            found.sort(key=lambda o: o["id"][::-1])     # some order of its own
        page = found[offset:offset + PAGE]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                                  "entry": [{"resource": o, "search": {"mode": "match"}} for o in page]}
        if offset + PAGE < len(found):
            following = [(k, v) for k, v in pairs if k != "_offset"] + [("_offset", str(offset + PAGE))]
            bundle["link"] = [{"relation": "next", "url": f"{BASE}/Observation?{urlencode(following)}"}]
        self.pages += 1
        return 200, {"Content-Type": "application/fhir+json"}, json.dumps(bundle)


@pytest.fixture
def source() -> Iterator[ServerSource]:
    with FhirClient(BASE, retries=1, sleep=lambda _: None) as client:
        yield ServerSource(client)


def event(number: int, patient: str) -> Any:
    return parse_notification(notification("event-notification", [heart_rate(patient)], start=number))


def opened(hospital: Hospital, log_and_gate: Any, source: ServerSource) -> tuple[Callable[..., Any], list[str]]:
    """The hospital's server answers the searches, and event 1 was seen three hours before NOW. Returns
    how to deliver event ``number`` ``minute`` minutes after NOW, and the patients queued."""
    _, events, gate = log_and_gate
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    queued: list[str] = []

    def deliver(number: int, minute: int, enqueue: Callable[[str], None] | None = None) -> Any:
        return handle(event(number, f"new{number}"), source=source, codes=[], debounce=gate,
                      enqueue=enqueue or queued.append, events=events, now=NOW + timedelta(minutes=minute))
    deliver(1, -180)
    return deliver, queued


@responses.activate
def test_a_catch_up_longer_than_its_pages_continues_where_it_stopped_until_done(log_and_gate: Any,
                                                                               source: ServerSource) -> None:
    """Events 2-4 lost, 56 Observations changed since event 1 was seen: 28 pages. The first
    catch-up reads 20 pages and queues their 40 patients; the next notification continues from the
    last change read and queues the rest; then nothing is owed. Before, every catch-up failed at
    page 20 and the window never cleared."""
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 16)
    deliver, queued = opened(hospital, log_and_gate, source)
    first = deliver(5, 0)
    assert first.missed == 3 and first.recovery_failed is None and hospital.pages == CATCH_UP_PAGES
    assert len(first.recovered) == PAGE * CATCH_UP_PAGES
    last_read = hospital.observations[PAGE * CATCH_UP_PAGES - 1]["meta"]["lastUpdated"]
    assert first.recovery_resumes == parse_datetime(last_read) - timedelta(milliseconds=1)
    second = deliver(6, 1)
    assert second.missed == 3 and second.recovery_resumes is None and second.recovery_failed is None
    assert hospital.searched_from[1] == "ge" + format_datetime(first.recovery_resumes)
    assert second.debounced == [hospital.observations[PAGE * CATCH_UP_PAGES - 1]["subject"]["reference"][8:]]
    third = deliver(7, 2)
    assert third.missed == 0 and len(hospital.searched_from) == 2
    assert sorted(p for p in queued if p.startswith("p")) == [f"p{i:03d}" for i in range(len(hospital.observations))]
    assert hospital.searched_from[0][2:] < format_datetime(NOW - timedelta(hours=2))   # from event 1, less the margin


@responses.activate
def test_a_partial_catch_up_whose_patients_were_not_queued_is_not_moved_on(log_and_gate: Any,
                                                                          source: ServerSource) -> None:
    """The broker refuses the patients of the first 20 pages: the window stays where it was."""
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 6)
    deliver, queued = opened(hospital, log_and_gate, source)
    with pytest.raises(RuntimeError):
        deliver(5, 0, enqueue=broker_down)
    again = deliver(6, 1)
    assert hospital.searched_from[1] == hospital.searched_from[0]
    assert again.recovery_resumes is not None and len(again.recovered) == PAGE * CATCH_UP_PAGES
    deliver(7, 2)
    assert len(set(hospital.searched_from)) == 2 and len(hospital.searched_from) == 3
    assert sorted(p for p in queued if p.startswith("p")) == [f"p{i:03d}" for i in range(len(hospital.observations))]


@responses.activate
@pytest.mark.parametrize("refuses_sort", [False, True])
def test_a_catch_up_longer_than_its_pages_from_a_server_that_cannot_sort_is_read_in_counted_windows(
        log_and_gate: Any, source: ServerSource, refuses_sort: bool) -> None:
    """A server that ignores or refuses _sort: what was not read cannot be told from what was, so the
    window is read in parts bounded on both sides (ge, lt), each counted (_summary=count) to fit in the
    pages a search may read, and continued from its end with the next notification until done. Every
    patient is queued. Before, the catch-up failed on every notification and the window was never read."""
    n = PAGE * CATCH_UP_PAGES * 2 + 7          # more than two searches' worth
    hospital = Hospital(n, sorts=False, refuses_sort=refuses_sort)
    deliver, queued = opened(hospital, log_and_gate, source)
    outs = [deliver(5, 0)]
    while outs[-1].recovery_resumes is not None and len(outs) < 10:
        outs.append(deliver(5 + len(outs), len(outs)))
    assert all(o.recovery_failed is None and o.recovery_skipped is None for o in outs)
    assert 3 <= len(outs) <= 5 and outs[-1].missed == 3 and outs[-1].recovery_resumes is None
    assert sorted(p for p in queued if p.startswith("p")) == [f"p{i:03d}" for i in range(n)]
    # The first search finds the server cannot sort; from then on each notification reads one counted window
    # (no sorted search first), from where the last one ended.
    windows = hospital.windows[1:]
    assert hospital.windows[0][1] is None and len(windows) == len(outs) and all(w[1] for w in windows)
    for (_, end), (start, _) in zip(windows, windows[1:]):
        assert start == "ge" + end[2:] and parse_datetime(end[2:]).microsecond % 1000 == 0   # whole milliseconds
    assert windows[-1][1] == "lt" + format_datetime(NOW + timedelta(minutes=len(outs) - 1, seconds=300))
    assert hospital.counted <= 12 * (len(outs) - 1)     # a few counts a window, not one per millisecond
    assert deliver(5 + len(outs), 20).missed == 0


@responses.activate
def test_a_long_catch_up_from_a_server_that_neither_sorts_nor_counts_stays_owed(log_and_gate: Any,
                                                                               source: ServerSource) -> None:
    """Without the order and without a count, what was not read cannot be told from what was: said, and
    owed (tried again with the next notification)."""
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 6, sorts=False, counts=False)
    deliver, queued = opened(hospital, log_and_gate, source)
    out = deliver(5, 0)
    assert out.recovery_retried and out.recovery_resumes is None
    assert "not sorted by _lastUpdated" in out.recovery_failed and "gives no count" in out.recovery_failed
    again = deliver(6, 1)
    assert again.recovery_retried and hospital.searched_from[1] == hospital.searched_from[0]


def test_a_window_moved_on_is_not_moved_past_an_earlier_one_opened_meanwhile(log_and_gate: Any) -> None:
    """While a partial catch-up runs, a notification owes events from earlier than its window: its
    settle keeps the earlier start (the search it made did not cover it)."""
    _, events, _ = log_and_gate
    events.record(event(1, "p1"), NOW)
    gap = events.record(event(5, "p5"), NOW + timedelta(minutes=10))
    assert gap is not None and gap.since == NOW - EventLog.MARGIN
    events.owe(event(6, "p6"), NOW - timedelta(hours=1))
    events.settle("sub-1", gap, done=False, resume=NOW + timedelta(minutes=5))
    again = events.record(event(7, "p7"), NOW + timedelta(minutes=20))
    assert again is not None and again.since == NOW - timedelta(hours=1) - EventLog.MARGIN
    events.settle("sub-1", again, done=False, resume=NOW + timedelta(minutes=5))
    moved = events.record(event(8, "p8"), NOW + timedelta(minutes=21))
    assert moved is not None and moved.since == NOW + timedelta(minutes=5)


@responses.activate
def test_the_hospital_is_told_the_catch_up_goes_on(server_app: Flask, queued: list) -> None:
    sc = server_app.test_client()
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 2, start=datetime.now(timezone.utc) - timedelta(minutes=1))
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    diagnostics(post(sc, notification("event-notification", [heart_rate("new1")], start=1)))
    text = diagnostics(post(sc, notification("event-notification", [heart_rate("new5")], start=5)))
    resumes = parse_datetime(hospital.observations[PAGE * CATCH_UP_PAGES - 1]["meta"]["lastUpdated"]) \
        - timedelta(milliseconds=1)
    assert (f"found {PAGE * CATCH_UP_PAGES} patient(s) with changed vital signs in as many pages as one search "
            f"may read; the rest is owed, continued from {format_datetime(resumes)} with the next notification"
            ) in text
    text = diagnostics(post(sc, notification("event-notification", [heart_rate("new6")], start=6)))
    assert "found 3 patient(s) with changed vital signs" in text and "continued" not in text   # from the last read
    assert "missed" not in diagnostics(post(sc, notification("event-notification", [heart_rate("new7")], start=7)))
    assert len(queued) == PAGE * CATCH_UP_PAGES + 2 + 4


def changed_at_one_instant(hospital: Hospital, first: int, count: int) -> str:
    """Observations ``first`` to ``first + count - 1`` changed at one instant (one transaction, a bulk load)."""
    instant = hospital.observations[first]["meta"]["lastUpdated"]
    for obs in hospital.observations[first:first + count]:
        obs["meta"]["lastUpdated"] = instant
    return instant


@responses.activate
def test_a_catch_up_over_more_pages_changed_at_one_instant_than_it_may_read_reads_on(log_and_gate: Any,
                                                                                     source: ServerSource) -> None:
    """26 pages changed at one instant after the window opened: the first catch-up stops at page 20 and
    continues from that instant; the next reads on past 20 pages while every change is at it, and
    finishes. Before, continued from the same instant, every notification read the same 20 pages and
    failed ('all changed at'), and nothing changed after them was ever caught up."""
    bulk = PAGE * CATCH_UP_PAGES + 6
    hospital = Hospital(2 + bulk + 1)
    changed_at_one_instant(hospital, 2, bulk)
    deliver, queued = opened(hospital, log_and_gate, source)
    first = deliver(5, 0)
    assert first.recovery_resumes is not None and first.recovery_failed is None
    second = deliver(6, 1)
    assert second.recovery_failed is None and second.recovery_skipped is None and second.recovery_resumes is None
    assert hospital.pages == CATCH_UP_PAGES + (bulk + 1 + PAGE - 1) // PAGE
    assert deliver(7, 2).missed == 0
    assert sorted(p for p in queued if p.startswith("p")) == [f"p{i:03d}" for i in range(len(hospital.observations))]


@responses.activate
def test_a_catch_up_gives_up_on_an_instant_past_the_pages_it_may_read_on_and_says_so(server_app: Flask,
                                                                                   queued: list) -> None:
    """More than ONE_INSTANT_PAGES pages changed at one instant: the catch-up reads that many, then gives
    up on the rest of that instant - said in the answer (and logged) - and continues after it, rather than
    failing every notification for good."""
    sc = server_app.test_client()
    bulk = PAGE * ONE_INSTANT_PAGES + 3
    hospital = Hospital(bulk + 1, start=datetime.now(timezone.utc) - timedelta(minutes=1))
    instant = changed_at_one_instant(hospital, 0, bulk)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    diagnostics(post(sc, notification("event-notification", [heart_rate("new1")], start=1)))
    # the window opens before the instant: the first search stops at page 20, all at the instant
    first = diagnostics(post(sc, notification("event-notification", [heart_rate("new5")], start=5)))
    assert "continued from" in first and "given up" not in first
    text = diagnostics(post(sc, notification("event-notification", [heart_rate("new6")], start=6)))
    past = format_datetime(parse_datetime(instant) + timedelta(microseconds=2))
    assert (f"given up on: Observations changed at {instant}: {ONE_INSTANT_PAGES} pages read (as many as are "
            "read at one instant) and more follow; any more changed at that instant were not read, their "
            "patients not rescored") in text
    assert f"continued from {past}" in text
    text = diagnostics(post(sc, notification("event-notification", [heart_rate("new7")], start=7)))
    assert "found 1 patient(s)" in text and "continued" not in text and "given up" not in text
    found = [p for p, _ in queued if p.startswith("p")]
    assert len(found) == PAGE * ONE_INSTANT_PAGES + 1 and f"p{bulk:03d}" in found     # the change after it


@responses.activate
def test_a_server_refusing_sort_is_searched_again_without_it(log_and_gate: Any, source: ServerSource) -> None:
    """A server that refuses a _sort it does not support (400): the catch-up asks again without _sort,
    as it did before every catch-up was sorted; a window of one page is caught up."""
    hospital = Hospital(3, refuses_sort=True)
    deliver, queued = opened(hospital, log_and_gate, source)
    out = deliver(5, 0)
    assert out.recovery_failed is None and sorted(out.recovered) == ["p000", "p001", "p002"]
    assert deliver(6, 1).missed == 0


@responses.activate
def test_a_page_limited_catch_up_reading_the_minimum_date_last_is_an_upstream_error(source: ServerSource) -> None:
    """The last change read says 0001-01-01 (a server's default date) after a later one: not sorted, an
    UpstreamError (the catch-up stays owed). Before, where to continue was computed first: OverflowError,
    a 500 to the hospital's server and the claim held for its lease."""
    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        query = dict(parse_qsl(urlsplit(request.url).query))
        offset = int(query.pop("_offset", 0))
        obs = heart_rate(f"p{offset}")
        obs["meta"] = {"lastUpdated": "0001-01-01T00:00:00Z" if offset else format_datetime(NOW)}
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": obs}], "link": [
            {"relation": "next", "url": f"{BASE}/Observation?{urlencode({**query, '_offset': offset + 1})}"}]}
        return 200, {}, json.dumps(bundle)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=answer)
    with pytest.raises(UpstreamError, match="not sorted"):
        catch_up(source, NOW - timedelta(hours=1), [], max_pages=2)


@responses.activate
def test_a_window_continued_at_one_instant_a_microsecond_early_still_reads_on(source: ServerSource) -> None:
    """Where a catch-up continues comes back through the float the event log keeps: a microsecond
    short of the instant less 1 ms. The pages all at that instant must still be read on, not "continued"
    from a microsecond later - the same pages again, for good."""
    hospital = Hospital(PAGE * 3 + 1)
    instant = parse_datetime(changed_at_one_instant(hospital, 0, PAGE * 3))
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    found = catch_up(source, instant - timedelta(milliseconds=1, microseconds=1), [], max_pages=2)
    assert found.resume is None and len(found.patients) == PAGE * 3 + 1


@responses.activate
def test_a_window_continued_a_millisecond_early_over_two_instants_is_continued_past_the_earlier_one(
        source: ServerSource) -> None:
    """A millisecond-precision server: 5 Observations changed at T - 1 ms, 5 at T (3 pages each, under
    one_instant_pages=4). Continued from T - 1 ms (a millisecond before the last change read), the window
    holds both instants: 4 pages, none of them past T. Before, that was taken as one instant: given up
    on, continued from T + 1 ms - two changes at T never read, and 'more than 4 pages changed at T' said
    (there are 3). Now it continues just past T - 1 ms, gives nothing up, and the next search reads T."""
    hospital = Hospital(10)
    T = NOW.replace(microsecond=0)
    for i, obs in enumerate(hospital.observations):
        obs["meta"]["lastUpdated"] = format_datetime(T - timedelta(milliseconds=1) if i < 5 else T)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    read: set[str] = set()
    since, searches = T - timedelta(hours=1), 0
    while since is not None and searches < 6:
        found = catch_up(source, since, [], max_pages=2, one_instant_pages=4)
        searches += 1
        assert found.skipped is None, found.skipped
        read.update(found.patients)
        if found.resume == T - timedelta(milliseconds=1) + timedelta(microseconds=2):
            # the float the event log keeps: it may come back a microsecond early, still past T - 1 ms
            found.resume -= timedelta(microseconds=1)
        since = found.resume
    assert read == {f"p{i:03d}" for i in range(10)} and searches == 4
    assert hospital.searched_from[2:] == ["ge" + format_datetime(T - timedelta(milliseconds=1)),
                                          "ge" + format_datetime(T - timedelta(milliseconds=1, microseconds=-1))]


@responses.activate
def test_giving_up_on_an_instant_continues_just_past_it_not_a_millisecond_later(source: ServerSource) -> None:
    """A microsecond-precision server: 8 Observations changed at T (4 pages, past one_instant_pages=3)
    and one at T + 0.5 ms (another transaction). Giving up on T's unread changes continues from T + 2 us
    (just past T, allowing for the float the event log keeps): the change at T + 0.5 ms is read. Before,
    it continued from T + 1 ms and skipped it, unsaid."""
    hospital = Hospital(9)
    T = NOW.replace(microsecond=100)    # '.0001Z' < '.0006Z': the fake server sorts the strings
    for i, obs in enumerate(hospital.observations):
        obs["meta"]["lastUpdated"] = format_datetime(T if i < 8 else T + timedelta(microseconds=500))
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    found = catch_up(source, T - timedelta(milliseconds=1), [], max_pages=2, one_instant_pages=3)
    assert found.resume == T + timedelta(microseconds=2) and len(found.patients) == 6
    assert found.skipped == (f"Observations changed at {format_datetime(T)}: 3 pages read (as many as are read "
                             "at one instant) and more follow; any more changed at that instant were not read, "
                             "their patients not rescored")
    later = catch_up(source, found.resume - timedelta(microseconds=1), [], max_pages=2, one_instant_pages=3)
    assert later.patients == ["p008"] and later.resume is None and later.skipped is None


@responses.activate
def test_a_server_that_cannot_sort_with_more_changes_in_one_millisecond_than_fit_gives_them_up_and_says_so(
        source: ServerSource) -> None:
    """Nine changes at one instant, at a server that refuses _sort, room for three: counting cannot split a
    millisecond, so what the pages hold is read, the rest given up on (said), and the next search starts
    just after that millisecond."""
    hospital = Hospital(12, refuses_sort=True)
    instant = NOW - timedelta(hours=1)
    for observation in hospital.observations[:9]:
        observation["meta"]["lastUpdated"] = format_datetime(instant)
    for minute, observation in enumerate(hospital.observations[9:]):
        observation["meta"]["lastUpdated"] = format_datetime(instant + timedelta(minutes=minute + 1))
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    found = catch_up(source, instant, [], max_pages=2, now=NOW)
    assert found.skipped and "more than 2 pages in one millisecond" in found.skipped
    assert instant < found.resume <= instant + timedelta(milliseconds=1) and len(found.patients) == 2 * PAGE
    assert hospital.counted < 48
    rest = catch_up(source, found.resume, [], max_pages=2, now=NOW)
    assert rest.skipped is None and rest.resume is None
    assert sorted(rest.patients) == [f"p{i:03d}" for i in range(9, 12)]


class Estimating(Hospital):
    """Counts ``1/divisor`` of what its pages hold (an estimate, or a count leaving something out)."""

    def __init__(self, count: int, divisor: int, **options: Any) -> None:
        super().__init__(count, **options)
        self.divisor = divisor

    def __call__(self, request: Any) -> tuple[int, dict[str, str], str]:
        status, headers, body = super().__call__(request)
        bundle = json.loads(body)
        if "total" in bundle and "entry" not in bundle:
            bundle["total"] //= self.divisor
        return status, headers, json.dumps(bundle)


@responses.activate
def test_a_window_counted_to_fit_that_has_more_pages_is_counted_again_for_fewer(source: ServerSource) -> None:
    """The count says half of what the pages hold: a window counted to fit has more pages, so it is counted
    again for half as many, and the catch-up goes on, every patient found."""
    hospital = Estimating(30, 2, sorts=False)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    since, found, rounds = NOW - timedelta(hours=3), set(), 0
    while since is not None and rounds < 20:
        out = catch_up(source, since, [], max_pages=2, now=NOW)
        assert out.skipped is None
        found.update(out.patients)
        since, rounds = out.resume, rounds + 1
    assert since is None and found == {f"p{i:03d}" for i in range(30)}


@responses.activate
def test_windows_that_keep_having_more_pages_than_counted_fail_and_stay_owed(source: ServerSource) -> None:
    """A count a tenth of the truth: three windows counted to fit all have more pages; an UpstreamError (owed,
    tried again with the next notification), nothing given up."""
    hospital = Estimating(30, 10, sorts=False)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    with pytest.raises(UpstreamError, match="windows counted to fit in 2 pages had more pages, 3 times"):
        catch_up(source, NOW - timedelta(hours=3), [], max_pages=2, now=NOW)


class IgnoresSecondBound(Hospital):
    """Takes the first of two _lastUpdated parameters only (ge), as some servers do."""

    def __call__(self, request: Any) -> tuple[int, dict[str, str], str]:
        parts = urlsplit(request.url)
        kept = [(k, v) for k, v in parse_qsl(parts.query) if not (k == "_lastUpdated" and v.startswith("lt"))]
        request.url = f"{BASE}/Observation?{urlencode(kept)}"
        return super().__call__(request)


@responses.activate
def test_a_server_ignoring_the_windows_end_is_an_error_not_a_millisecond_given_up(source: ServerSource) -> None:
    """Every window is counted as the whole rest: the search narrows to one millisecond, whose read brings
    changes from outside it. An UpstreamError saying the server does not keep to the bounds (owed), not
    'more than 2 pages in one millisecond' given up on, a millisecond at a time."""
    hospital = IgnoresSecondBound(60, sorts=False)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    with pytest.raises(UpstreamError, match="does not keep to the window's bounds"):
        catch_up(source, NOW - timedelta(hours=3), [], max_pages=2, now=NOW)


@responses.activate
def test_counts_are_asked_with_one_retry_like_the_pages(source: ServerSource) -> None:
    """The hospital's server waits for our answer: a count that fails is retried once, not the client's
    full retries."""
    hospital = Hospital(30, sorts=False)
    counted: list[int] = []

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        if "_summary=count" in request.url:
            counted.append(1)
            return 503, {}, "{}"
        return hospital(request)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=answer)
    with FhirClient(BASE, retries=3, sleep=lambda _: None) as client:
        with pytest.raises(UpstreamError):
            catch_up(ServerSource(client), NOW - timedelta(hours=3), [], max_pages=2, now=NOW)
    assert len(counted) == 2


@responses.activate
def test_a_server_found_unsorted_that_gives_no_count_still_has_its_short_catch_ups_read(
        log_and_gate: Any, source: ServerSource) -> None:
    """Once a long catch-up found the server cannot sort (and it gives no count: owed), a later short one
    (fewer than 20 pages) is still read whole, as any catch-up of such a server was before windows."""
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 6, sorts=False, counts=False)
    deliver, queued = opened(hospital, log_and_gate, source)
    assert deliver(5, 0).recovery_retried and source.unsorted is not None
    hospital.observations = hospital.observations[-3:]        # the rest now lies before the window
    out = deliver(6, 1)
    assert out.recovery_failed is None and out.recovery_resumes is None
    assert sorted(out.recovered) == sorted(o["subject"]["reference"][8:] for o in hospital.observations)


@responses.activate
def test_a_server_refusing_the_count_still_has_its_short_catch_ups_read(log_and_gate: Any,
                                                                       source: ServerSource) -> None:
    """As above, for a server that refuses _summary=count (a 400), not one that ignores it."""
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 6, sorts=False, counts=400)
    deliver, queued = opened(hospital, log_and_gate, source)
    first = deliver(5, 0)
    assert first.recovery_retried and "gives no count" in first.recovery_failed and source.unsorted is not None
    hospital.observations = hospital.observations[-3:]
    out = deliver(6, 1)
    assert out.recovery_failed is None and len(out.recovered) == 3


class Seconds(Hospital):
    """Keeps whole seconds: reads each _lastUpdated bound without its fraction."""

    def __call__(self, request: Any) -> tuple[int, dict[str, str], str]:
        parts = urlsplit(request.url)
        pairs = [(k, re.sub(r"\.\d+", "", v) if k == "_lastUpdated" else v) for k, v in parse_qsl(parts.query)]
        request.url = f"{BASE}/Observation?{urlencode(pairs)}"
        return super().__call__(request)


@responses.activate
def test_a_server_keeping_whole_seconds_is_read_in_windows_to_the_end(source: ServerSource) -> None:
    """Windows start at a fraction of a second (our clock), the server reads the bound to the second and brings
    a change stamped at that whole second: inside the window at its precision, not a server ignoring bounds."""
    hospital = Seconds(PAGE * 2 * 4, sorts=False)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    since, found, rounds = parse_datetime(hospital.observations[0]["meta"]["lastUpdated"]) + timedelta(
        milliseconds=400), set(), 0
    while since is not None and rounds < 20:
        out = catch_up(source, since, [], max_pages=2, now=NOW)
        found.update(out.patients)
        since, rounds = out.resume, rounds + 1
    assert since is None and found == {f"p{i:03d}" for i in range(len(hospital.observations))}


@responses.activate
def test_an_order_that_only_looks_sorted_is_counted_and_read_in_windows(source: ServerSource) -> None:
    """A server that ignores _sort and answers in the order the Observations were made: ascending, except one
    made early and changed just now, read last. Continuing from it would skip the 15 not read, all changed
    before it; the count of changes before it says more than were read, so the rest is read in windows."""
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 16, sorts=False, created_order=True)
    recent = hospital.observations[PAGE * CATCH_UP_PAGES - 1]
    recent["meta"]["lastUpdated"] = format_datetime(NOW - timedelta(minutes=1))
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    since, found, rounds = NOW - timedelta(hours=3), set(), 0
    first = catch_up(source, since, [], max_pages=CATCH_UP_PAGES, now=NOW)
    assert source.unsorted is not None and "not sorted by _lastUpdated" in source.unsorted[0]
    found.update(first.patients)
    since = first.resume
    while since is not None and rounds < 20:
        out = catch_up(source, since, [], max_pages=CATCH_UP_PAGES, now=NOW)
        found.update(out.patients)
        since, rounds = out.resume, rounds + 1
    assert found == {f"p{i:03d}" for i in range(len(hospital.observations))}


@responses.activate
def test_a_server_found_unsorted_is_asked_sorted_again_an_hour_later(source: ServerSource) -> None:
    hospital = Hospital(3)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    source.unsorted = ("not sorted", PAGE, time.monotonic() - 3599)
    catch_up(source, NOW - timedelta(hours=3), [], now=NOW)
    assert hospital.sorted_asked == 0 and source.unsorted is not None
    source.unsorted = ("not sorted", PAGE, time.monotonic() - 3601)
    found = catch_up(source, NOW - timedelta(hours=3), [], now=NOW)
    assert hospital.sorted_asked == 1 and source.unsorted is None and len(found.patients) == 3


@responses.activate
def test_an_observation_whose_id_is_not_a_string_does_not_break_the_catch_up(source: ServerSource) -> None:
    hospital = Hospital(3)
    hospital.observations[1]["id"] = ["not", "a", "string"]
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    found = catch_up(source, NOW - timedelta(hours=3), [], now=NOW)
    assert sorted(found.patients) == ["p000", "p001", "p002"]


@responses.activate
def test_a_server_once_found_unsorted_without_a_count_is_not_taken_at_its_word_an_hour_later(
        source: ServerSource) -> None:
    """The hour is up, the sorted search is asked again, the order read looks ascending but cannot be checked
    (no count): as before the hour was up, the catch-up fails and stays owed rather than skipping what it did
    not read."""
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 16, sorts=False, created_order=True, counts=False)
    hospital.observations[PAGE * CATCH_UP_PAGES - 1]["meta"]["lastUpdated"] = format_datetime(NOW - timedelta(minutes=1))
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    source.unsorted, source.was_unsorted = ("not sorted", PAGE, time.monotonic() - 3601), True
    with pytest.raises(UpstreamError, match="gives no count"):
        catch_up(source, NOW - timedelta(hours=3), [], max_pages=CATCH_UP_PAGES, now=NOW)
    assert hospital.sorted_asked == 1


@responses.activate
def test_a_count_a_little_off_does_not_make_a_sorting_server_unsorted(source: ServerSource) -> None:
    hospital = Estimating(PAGE * CATCH_UP_PAGES + 16, 1)
    original = hospital.__call__

    def one_more(request: Any) -> tuple[int, dict[str, str], str]:
        status, headers, body = original(request)
        bundle = json.loads(body)
        if "total" in bundle and "entry" not in bundle:
            bundle["total"] += 1                  # a late commit, an estimate
        return status, headers, json.dumps(bundle)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=one_more)
    found = catch_up(source, NOW - timedelta(hours=3), [], max_pages=CATCH_UP_PAGES, now=NOW)
    assert found.resume is not None and source.unsorted is None and hospital.counted == 1


@responses.activate
@pytest.mark.parametrize("status", [401, 403])
def test_a_count_refused_for_our_credentials_is_said_so_not_taken_for_no_count(source: ServerSource,
                                                                               status: int) -> None:
    hospital = Hospital(PAGE * CATCH_UP_PAGES + 6, sorts=False, counts=status)
    responses.add_callback(responses.GET, f"{BASE}/Observation", callback=hospital)
    with pytest.raises(UpstreamError, match="refused our credentials") as refused:
        catch_up(source, NOW - timedelta(hours=3), [], max_pages=CATCH_UP_PAGES, now=NOW)
    assert "gives no count" not in refused.value.message
