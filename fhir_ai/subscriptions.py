"""Subscriptions (R4 backport, rest-hook): read notifications, find changed vital signs, queue debounced rescoring."""
from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import redis

from .config import Settings
from .errors import BadRequest, FhirAiError, NotSupported, Unauthorized, UpstreamError, UpstreamNotFound
from .fhir.client import PagingLimit
from .fhir.sources import ServerSource, Source
from .fhir.times import format_datetime, parse_datetime
from .subscription_log import EventLog, whole_number

log = logging.getLogger(__name__)

NOTIFICATION_TYPES = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")
VITAL_SIGNS = ("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")
# "registered" has no value yet: nothing for a model to read.
IGNORED_STATUSES = frozenset({"registered"})


@dataclass
class Event:
    number: str | None
    focus: str | None                      # 'Observation/123'
    resource: dict[str, Any] | None        # full-resource payloads carry it
    timestamp: datetime | None = None      # when it happened (the hospital's clock), if said


@dataclass
class Notification:
    subscription: str                      # the Subscription's id
    type: str
    topic: str | None = None
    events_since_start: str | None = None
    events: list[Event] = field(default_factory=list)


@dataclass
class Outcome:
    """What one notification did (answered to the hospital's server, counted in tests)."""
    events: int = 0
    queued: list[str] = field(default_factory=list)       # patients whose rescoring was queued
    debounced: list[str] = field(default_factory=list)    # patients already waiting for one
    ignored: int = 0                                      # not a vital sign, no patient, focus gone
    gone: int = 0                                         # of those: focus not found at the hospital's server
    unreadable_source: int = 0                            # of those: id-only, and the source (a folder) cannot read
    unread: int = 0                                       # focus not read for now: left to the catch-up
    unread_reason: str | None = None                      # why (the first of them)
    missed: int = 0                                       # events numbered but never sent us, sent empty, unread
    recovered: list[str] = field(default_factory=list)    # patients found by the catch-up search after a gap
    recovery_failed: str | None = None                    # why the catch-up search failed
    recovery_retried: bool = False                        # it failed for now: tried again with the next notification
    recovery_resumes: datetime | None = None              # it read as many pages as it may: continued from here
    recovery_skipped: str | None = None                   # changes it gave up on (too many at one instant)
    restarted: bool = False                               # the event numbers restarted without a handshake


def _value(param: dict[str, Any]) -> Any:
    for key, value in param.items():
        if key.startswith("value"):
            return value
    return None


def _tail(reference: Any, kind: str) -> str | None:
    """'Subscription/abc', '.../Subscription/abc/_history/2' → 'abc' (None if another type, or no string)."""
    if not reference or not isinstance(reference, str):
        return None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == kind and parts[-1] else None


_JSON_KIND = {list: "an array", dict: "an object", str: "a string"}


def _kind(value: Any, expected: type, path: str, *, optional: bool = True) -> None:
    """400 naming ``path`` unless ``value`` is of the JSON type FHIR gives that element (or absent)."""
    if not (isinstance(value, expected) or (optional and value is None)):
        raise BadRequest(f"{path} is not {_JSON_KIND[expected]} as FHIR has it", expression=path)


def _check_shape(bundle: dict[str, Any]) -> None:
    """The elements a notification is read by have the JSON types FHIR gives them; else 400 naming the first
    that does not (a number where an entry should be, a list as a parameter's name...). An item of an array
    is never null."""
    def parameters(items: Any, path: str) -> None:
        _kind(items, list, path)
        for i, param in enumerate(items or []):
            _kind(param, dict, f"{path}[{i}]", optional=False)
            _kind(param.get("name"), str, f"{path}[{i}].name")
            parameters(param.get("part"), f"{path}[{i}].part")

    _kind(bundle.get("entry"), list, "Bundle.entry")
    for i, entry in enumerate(bundle.get("entry") or []):
        where = f"Bundle.entry[{i}]"
        _kind(entry, dict, where, optional=False)
        _kind(entry.get("fullUrl"), str, f"{where}.fullUrl")
        _kind(entry.get("request"), dict, f"{where}.request")
        _kind((entry.get("request") or {}).get("url"), str, f"{where}.request.url")
        resource = entry.get("resource")
        _kind(resource, dict, f"{where}.resource")
        if resource is not None:
            _kind(resource.get("resourceType"), str, f"{where}.resource.resourceType")
            _kind(resource.get("id"), str, f"{where}.resource.id")
            if resource.get("resourceType") == "Parameters":
                parameters(resource.get("parameter"), f"{where}.resource.parameter")


def parse_notification(bundle: Any) -> Notification:
    """A `history` Bundle whose first entry is the SubscriptionStatus (a Parameters in the R4 backport)."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "history":
        raise BadRequest("a subscription notification is a Bundle of type history", expression="Bundle.type")
    _check_shape(bundle)
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    status = (entries[0].get("resource") if entries else None) or {}
    if status.get("resourceType") != "Parameters":
        raise BadRequest("the notification's first entry must be the SubscriptionStatus Parameters",
                         expression="Bundle.entry[0].resource")
    params: dict[str, Any] = {}
    raw_events: list[list[dict[str, Any]]] = []
    for param in status.get("parameter") or []:
        if not isinstance(param, dict):
            continue
        if param.get("name") == "notification-event":
            raw_events.append([p for p in param.get("part") or [] if isinstance(p, dict)])
        else:
            params.setdefault(param.get("name"), _value(param))
    reference = params.get("subscription")
    subscription = _tail(reference.get("reference") if isinstance(reference, dict) else reference, "Subscription")
    if not subscription:
        raise BadRequest("the SubscriptionStatus names no Subscription",
                         expression="Bundle.entry[0].resource.parameter.where(name='subscription')")
    kind = params.get("type")
    if kind not in NOTIFICATION_TYPES:
        raise BadRequest(f"unknown notification type {kind!r}",
                         expression="Bundle.entry[0].resource.parameter.where(name='type')")
    out = Notification(subscription, kind, params.get("topic"),
                       _counter(params.get("events-since-subscription-start"),
                                "Bundle.entry[0].resource.parameter.where(name='events-since-subscription-start')"))
    if kind != "event-notification":
        return out
    by_url = {_short(e.get("fullUrl")): e for e in entries[1:] if e.get("fullUrl")}
    by_ref = {f"{e['resource'].get('resourceType')}/{e['resource'].get('id')}": e
              for e in entries[1:] if isinstance(e.get("resource"), dict)}
    if raw_events:
        for parts in raw_events:
            values = {p.get("name"): _value(p) for p in parts}
            focus = values.get("focus")
            focus_ref = _short(focus.get("reference") if isinstance(focus, dict) else None)
            entry = by_ref.get(focus_ref or "") or by_url.get(focus_ref or "")
            number = _counter(values.get("event-number"), "Bundle.entry[0].resource.parameter.where("
                              "name='notification-event').part.where(name='event-number')")
            out.events.append(Event(number, focus_ref, (entry or {}).get("resource"), _instant(values.get("timestamp"))))
    else:
        # Older servers list the focus resources as entries without notification-event parameters.
        for entry in entries[1:]:
            resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else None
            ref = (f"{resource['resourceType']}/{resource.get('id')}" if resource
                   else _short(entry.get("fullUrl") or (entry.get("request") or {}).get("url")))
            out.events.append(Event(None, ref, resource))
    return out


# Event numbers and counts beyond this are refused: Redis' Lua keeps numbers as doubles (exact up to
# 2**53) and writes 1e17 as '1e+17', which HINCRBY refuses.
LARGEST_NUMBER = 2 ** 53


def _counter(value: Any, expression: str) -> str | None:
    """An event number or count as sent (None if absent); one out of range makes the notification invalid.
    Anything that is not a whole number stays as it is (read as no number)."""
    if value is None:
        return None
    number = whole_number(str(value))
    if number is not None and not 0 <= number <= LARGEST_NUMBER:
        raise BadRequest(f"an event number or count must be between 0 and {LARGEST_NUMBER}", expression=expression)
    return str(value)


def _instant(value: Any) -> datetime | None:
    try:
        return parse_datetime(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _short(url: str | None) -> str | None:
    """'https://ehr/fhir/Observation/1/_history/3' → 'Observation/1'."""
    if not url:
        return None
    parts = url.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def secrets(settings: Settings) -> dict[str, str]:
    """Subscription id → shared secret, from ``subscription_secrets`` ('id=secret,id2=secret2')."""
    out: dict[str, str] = {}
    for pair in settings.subscription_secrets.split(","):
        name, sep, secret = pair.strip().partition("=")
        if sep and name.strip() and secret.strip():
            out[name.strip()] = secret.strip()
    return out


def screen(settings: Settings, presented: str | None) -> None:
    """Before the body is read: the secret presented must be one of those configured (for some subscription)."""
    given = (presented or "").encode()
    matches = [hmac.compare_digest(secret.encode(), given) for secret in secrets(settings).values()]   # all of them
    if not presented or not any(matches):
        log.warning("subscription notification refused before reading it: no secret, or not one configured")
        raise Unauthorized("unknown subscription or wrong secret")


def authenticate(settings: Settings, subscription: str, presented: str | None) -> None:
    """The secret configured for this subscription must be presented; nothing configured → refused."""
    expected = secrets(settings).get(subscription)
    if not expected or not presented or not hmac.compare_digest(expected.encode(), presented.encode()):
        log.warning("subscription notification for Subscription/%s refused: unknown subscription or wrong secret",
                    subscription)
        raise Unauthorized("unknown subscription or wrong secret")


class Debouncer:
    """One pending rescoring per patient: a Redis key with a TTL marks "already queued"."""

    def __init__(self, client: redis.Redis, window: float, prefix: str) -> None:
        self.client, self.window, self.prefix = client, window, prefix

    def key(self, patient_id: str) -> str:
        return f"{self.prefix}{patient_id}"

    def claim(self, patient_id: str) -> bool:
        """True if no rescoring of this patient is waiting (this caller must queue one)."""
        if self.window <= 0:
            return True
        return bool(self.client.set(self.key(patient_id), b"1", nx=True, px=max(1, int(self.window * 1000))))

    def release(self, patient_id: str) -> None:
        self.client.delete(self.key(patient_id))


_debouncers: dict[tuple[Any, ...], Debouncer] = {}


def debouncer(settings: Settings) -> Debouncer:
    key = (os.getpid(), settings.broker_url, settings.job_queue, settings.rescore_debounce)
    if key not in _debouncers:
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        _debouncers[key] = Debouncer(client, settings.rescore_debounce, f"fhir_ai:{settings.job_queue}:rescore:")
    return _debouncers[key]


_event_logs: dict[tuple[Any, ...], EventLog] = {}


def event_log(settings: Settings) -> EventLog:
    key = (os.getpid(), settings.broker_url, settings.job_queue)
    if key not in _event_logs:
        client = debouncer(settings).client
        _event_logs[key] = EventLog(client, f"fhir_ai:{settings.job_queue}:subscription:")
    return _event_logs[key]


@dataclass
class CatchUp:
    """What one catch-up search found."""
    patients: list[str]
    resume: datetime | None = None    # it stopped at its page limit: every change before this was read
    skipped: str | None = None        # what it gave up on, moving ``resume`` past it (said, never silently)


# Pages one catch-up search reads (200 Observations each); a longer window is continued with the next notification.
CATCH_UP_PAGES = 20
# Pages it reads on while every change read is at the instant it continues from (a bulk load, one
# transaction): continued from there, it would read the same pages again, for good. Past these, the
# changes at that instant not read are given up on, said in the answer and the logs.
ONE_INSTANT_PAGES = 50
# Where a catch-up continues comes back through the float the event log keeps: a microsecond off either
# way. Changes this close together are taken as one instant, and it continues this far past an instant.
FLOAT_TOLERANCE = timedelta(microseconds=2)
# A server that cannot sort by _lastUpdated is read in windows bounded on both sides, each sized by counting
# (``_summary=count``): at most this many counts per window (a millisecond's resolution over years: 45).
COUNT_PROBES = 48
# The window's end when everything fits: this far past our clock, so that a change stamped by a server
# clock ahead of ours is not left after it.
CLOCK_MARGIN = timedelta(minutes=5)
# A window counted to fit that had more pages is counted again for half as many, this many times in all.
WINDOW_ATTEMPTS = 3
# How long a server found unable to sort is read in counted windows straight away (seconds).
UNSORTED_FOR = 3600.0
# A count asked for and refused so: the server does not take _summary=count (other errors are errors).
NO_COUNT_STATUSES = frozenset({400, 405, 422, 501})


class _NoCount(UpstreamError):
    """The server gives no ``_summary=count``: a catch-up cannot be read in counted windows."""


class _SortRefused(Exception):
    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


def catch_up(source: Source, since: datetime, codes: Iterable[tuple[str, str]],
             max_pages: int = CATCH_UP_PAGES, one_instant_pages: int = ONE_INSTANT_PAGES,
             now: datetime | None = None) -> CatchUp:
    """Patients with a vital sign changed since ``since`` at the hospital's server (after a gap).

    The search is sorted by _lastUpdated: one that has more than ``max_pages`` pages returns the
    patients of the pages it read and where to continue (``resume``: the last change it read, searched
    again with ``ge``, so that changes at that same instant are not skipped). That needs the order
    checked, not trusted: a server that ignored _sort (or sends no meta.lastUpdated) cannot be
    continued from where it stopped: it is read in windows instead (``_windowed``). While every change read is at the
    instant it started from, it reads on, up to ``one_instant_pages``; past those it gives up on that
    instant's changes not read (``skipped``) and continues just after it. A window continued a
    millisecond early that holds an earlier instant too (read before) is continued just past that one:
    nothing given up. A server that refuses the sorted
    search (HTTP 400 to its first page: some refuse a _sort they do not support) is asked again without
    _sort, and read in windows too when it has more pages than it may read."""
    if not isinstance(source, ServerSource):
        raise NotSupported("the configured source cannot be searched for changed Observations")
    codes = list(codes)
    until = (now or datetime.now(timezone.utc)) + CLOCK_MARGIN
    if source.unsorted is not None and time.monotonic() - source.unsorted[2] > UNSORTED_FOR:
        source.unsorted = None                # an hour on: the server may have been mended; found out again
    if source.unsorted is not None:           # found before: no sorted search first, no page read twice
        try:
            return _windowed(source, since, codes, max_pages, source.unsorted[1], until, source.unsorted[0])
        except _NoCount:                      # no count: a window that fits in the pages is still read whole
            return _changed(source, since, codes, max_pages, one_instant_pages, sort=False, until=until)
    try:
        return _changed(source, since, codes, max_pages, one_instant_pages, sort=True, until=until)
    except _SortRefused as refused:
        log.warning("the catch-up search sorted by _lastUpdated was refused (%s); searched again without _sort",
                    refused.error.message)
        return _changed(source, since, codes, max_pages, one_instant_pages, sort=False, until=until)


def _changed(source: ServerSource, since: datetime, codes: list[tuple[str, str]], max_pages: int,
             one_instant_pages: int, sort: bool, until: datetime) -> CatchUp:
    params: list[tuple[str, Any]] = [("_lastUpdated", "ge" + format_datetime(since))]
    params += [("_sort", "_lastUpdated")] if sort else []
    params.append(("_count", 200))
    patients: dict[str, None] = {}
    first: datetime | None = None
    last: datetime | None = None
    # The distinct changes read within FLOAT_TOLERANCE of the last (ascending), and the latest read
    # before those: where to continue from past an earlier instant.
    recent: list[datetime] = []
    before: datetime | None = None
    ordered, read = True, 0
    stamps: dict[Any, datetime] = {}    # when each change read (by id) was made, while they come in order
    # Continued a millisecond early (see below): every change read up to here is at most at that
    # instant. A few microseconds more: ``since`` came back through the float the event log keeps (a
    # microsecond off either way); a hair short, a window of one instant would be "continued" from
    # where it began.
    instant = since + timedelta(milliseconds=1) + FLOAT_TOLERANCE

    def one_instant() -> bool:
        """Every change read is at one instant, at most the one the window was continued from. A
        window continued a millisecond early may hold the millisecond before it too (read before):
        not one instant (on a millisecond-precision server, two adjacent instants)."""
        return (ordered and first is not None and last is not None and last <= instant
                and last - first <= FLOAT_TOLERANCE)

    pages_read = [max_pages]       # past max_pages only when reading on at one instant

    def at_one_instant(pages: int) -> bool:
        on = pages < one_instant_pages and one_instant()
        pages_read[0] = max(pages_read[0], pages + on)
        return on

    try:
        # One retry at most: the hospital's server waits for our answer, and the next notification tries again.
        for resource in source.client.search("Observation", params, max_pages=max_pages, retries=1,
                                             more=at_one_instant if sort else None):
            read += 1
            changed = _last_updated(resource)
            if changed is None or (last is not None and changed < last):
                ordered = False
            last = changed
            if ordered and changed is not None:
                rid = resource.get("id")
                stamps[rid if isinstance(rid, str) and rid else ("#", read)] = changed
                first = first or changed
                if not recent or changed != recent[-1]:
                    recent.append(changed)
                while recent[0] < changed - FLOAT_TOLERANCE:
                    before = recent.pop(0)
            patient = subject_patient(resource)
            if patient and is_vital_sign(resource, codes):
                patients[patient] = None
    except PagingLimit:
        window = f"the catch-up search for Observations changed since {format_datetime(since)}"

        def in_windows(why: str) -> CatchUp:
            log.warning("%s has more than %d pages, %s: read in windows sized by counting", window, max_pages, why)
            source.unsorted = (why, max(1, read // pages_read[0]), time.monotonic())
            source.was_unsorted = True
            return _windowed(source, since, codes, max_pages, source.unsorted[1], until, why)
        if not sort or not ordered or last is None:
            return in_windows("the server refuses _sort=_lastUpdated" if not sort
                              else "not sorted by _lastUpdated (or without meta.lastUpdated)")
        if one_instant():
            # Every change read, even past max_pages, at one instant: continued from it, the same pages
            # again. Given up on (said), continued just past it (the float the event log keeps: a hair
            # later, so that it does not come back before it; a change within those microseconds is
            # taken as of that instant).
            # More pages follow, not necessarily of that instant: "any more", not "more than".
            skipped = (f"Observations changed at {format_datetime(last)}: {one_instant_pages} pages read (as many "
                       "as are read at one instant) and more follow; any more changed at that instant were not "
                       "read, their patients not rescored")
            log.error("%s: %s", window, skipped)
            return CatchUp(list(patients), last + FLOAT_TOLERANCE, skipped)
        if last <= instant and before is not None:
            # At most at the instant continued from, but an earlier one too (the millisecond before it,
            # read before): continued just past the earlier one - the same pages less those, nothing
            # skipped (every change before ``last`` was read), and the next search is of one instant.
            resume = before + FLOAT_TOLERANCE
        else:
            # Continued a millisecond early: digits past the microsecond, and the float the event log keeps,
            # must not move it past a change at that instant.
            resume = last - timedelta(milliseconds=1)
        # The order read is the server's word: one that ignores _sort may send an order that only looks
        # ascending (creation order), and continuing would skip the changes not read that were made before
        # ``resume``. Counted (where the server counts): more of them than were read means not sorted.
        made = _count(source, [("_lastUpdated", "ge" + format_datetime(since)),
                               ("_lastUpdated", "lt" + format_datetime(resume))])
        if made is None and source.counts is False and source.was_unsorted:
            # Found unable to sort before, and no count to check the order by: its word is not taken.
            return in_windows("found not sorted by _lastUpdated before, and no count to check its order by")
        before_resume = sum(1 for stamp in stamps.values() if stamp < resume)
        # A margin: a count a little off (an estimate, a late commit, a result filtered after the query)
        # is no sign of an unsorted answer; the windows would read the same again.
        if made is not None and made > before_resume + max(2, before_resume // 100):
            return in_windows(f"not sorted by _lastUpdated ({made} changes before the last one read, of which "
                              f"{before_resume} were read)")
        return CatchUp(list(patients), resume)
    except UpstreamError as exc:
        if sort and not read and exc.upstream_status == 400:
            raise _SortRefused(exc) from exc
        raise
    return CatchUp(list(patients))


def _count(source: ServerSource, params: list[tuple[str, Any]]) -> int | None:
    """How many Observations match (``_summary=count``, one retry); None when the server gives no count
    (no ``total``, or it refuses the parameter: NO_COUNT_STATUSES). Remembered in ``source.counts``."""
    try:
        bundle = source.client.get("Observation", [*params, ("_summary", "count")], retries=1)
    except UpstreamError as exc:
        if exc.upstream_status in NO_COUNT_STATUSES:
            source.counts = False
            return None
        raise
    total = bundle.get("total")
    source.counts = type(total) is int and total >= 0
    return total if source.counts else None


def _windowed(source: ServerSource, since: datetime, codes: list[tuple[str, str]], max_pages: int,
              per_page: int, until: datetime, why: str) -> CatchUp:
    """The catch-up of a server that cannot sort by _lastUpdated (``why``), for more pages than a search may
    read: the changes from ``since`` up to an end found by counting (``_summary=count``, a binary search
    over the end, stopped once the window is at least half full), as many as ``max_pages`` of the server's
    pages (``per_page``: what its pages held) can hold less a tenth (changes coming in meanwhile), read whole
    in a window bounded on both sides (``ge`` since, ``lt`` end: no order needed), and continued from that
    end (``resume``) with the next notification; done when the end reached ``until``.

    Not taken on trust: a change read outside its window (a server that ignores the second bound) is an
    UpstreamError, and so is a server that gives no count; the catch-up stays owed. A window counted to fit
    that has more pages (a count that is an estimate, changes coming in) is counted again for half as many,
    WINDOW_ATTEMPTS times at most. More changes in the first millisecond than fit are read as far as the
    pages go and the rest of that millisecond given up on (``skipped``, said) - only when every change read
    says it lies in that millisecond. Counts and pages are asked with one retry, like the pages of the search.
    """
    start = format_datetime(since)
    window = f"the catch-up search for Observations changed since {start} ({why})"
    # A server reads a bound at its own precision (milliseconds, or whole seconds: 'ge 06:00:00.4' may
    # bring a change stamped 06:00:00): within a second of the window is inside it. A server ignoring the
    # second bound brings the whole rest, far outside.
    slack = timedelta(seconds=1)

    def bounded(end: datetime) -> list[tuple[str, Any]]:
        return [("_lastUpdated", "ge" + start), ("_lastUpdated", "lt" + format_datetime(end))]

    def count(end: datetime) -> int:
        total = _count(source, bounded(end))
        if total is None:
            raise _NoCount(f"{window} has more than {max_pages} pages, and the server gives no count "
                           "(_summary=count) to read it in windows: it cannot be continued", temporary=False)
        return total

    room = max(1, per_page * max_pages * 9 // 10)
    for _ in range(WINDOW_ATTEMPTS):
        end, counts = until, 1
        if count(until) > room:
            # count(fits) <= room < count(too_many); a window at least half full is enough (fewer counts).
            fits, too_many, held = since, until, 0
            while too_many - fits > timedelta(milliseconds=1) and not (fits > since and 2 * held >= room):
                middle = fits + (too_many - fits) / 2
                middle -= timedelta(microseconds=middle.microsecond % 1000)   # whole milliseconds: what servers keep
                if middle <= fits:
                    break
                if counts >= COUNT_PROBES:
                    raise UpstreamError(f"{window}: no window that fits in {max_pages} pages was found in "
                                        f"{COUNT_PROBES} counts",
                                        temporary=False)
                counts += 1
                found = count(middle)
                if found <= room:
                    fits, held = middle, found
                else:
                    too_many = middle
            end = fits if fits > since else too_many
        patients: dict[str, None] = {}
        stamped = True                       # every change read says when it changed
        try:
            for resource in source.client.search("Observation", [*bounded(end), ("_count", 200)],
                                                  max_pages=max_pages, retries=1):
                changed = _last_updated(resource)
                if changed is None:
                    stamped = False
                elif not since - slack <= changed < end + slack:
                    raise UpstreamError(f"{window}: the server answered the window up to {format_datetime(end)} "
                                        f"with a change at {format_datetime(changed)}: it does not keep to the "
                                        "window's bounds, so it cannot be read in windows", temporary=False)
                patient = subject_patient(resource)
                if patient and is_vital_sign(resource, codes):
                    patients[patient] = None
        except PagingLimit as exc:
            if end > since + timedelta(milliseconds=1):   # counted to fit, yet more pages: count again for fewer
                room = max(1, room // 2)
                continue
            if not stamped:
                raise UpstreamError(f"{window}: more than {max_pages} pages between {start} and "
                                    f"{format_datetime(end)}, and changes without meta.lastUpdated: it cannot be "
                                    "told whether they lie in that millisecond", temporary=False) from exc
            skipped = (f"Observations changed between {start} and {format_datetime(end)}: more than {max_pages} "
                       "pages in one millisecond, and the server cannot sort them; those not read were given up "
                       "on, their patients not rescored")
            log.error("%s: %s", window, skipped)
            return CatchUp(list(patients), end, skipped)
        log.info("%s: read up to %s (%d count(s))", window, format_datetime(end), counts)
        return CatchUp(list(patients), None if end >= until else end)
    raise UpstreamError(f"{window}: windows counted to fit in {max_pages} pages had more pages, {WINDOW_ATTEMPTS} "
                        "times (the server's count is an estimate, or changes keep coming in)", temporary=False)


def _last_updated(resource: Any) -> datetime | None:
    meta = resource.get("meta") if isinstance(resource, dict) else None
    return _instant(meta.get("lastUpdated")) if isinstance(meta, dict) else None


def subject_patient(resource: Any) -> str | None:
    """The Patient id an Observation is about; None when its subject is not a readable Patient reference
    (the hospital's server may send JSON that is not valid FHIR: it must not break a notification)."""
    subject = resource.get("subject") if isinstance(resource, dict) else None
    return _tail(subject.get("reference"), "Patient") if isinstance(subject, dict) else None


def _objects(value: Any) -> list[dict[str, Any]]:
    """The objects of a FHIR list element; whatever else the server sent there is skipped."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def is_vital_sign(observation: dict[str, Any], codes: Iterable[tuple[str, str]]) -> bool:
    """A vital sign by category, or any code the deterioration mapping reads (components included)."""
    status = observation.get("status")
    if observation.get("resourceType") != "Observation" or not isinstance(status, (str, type(None))) \
            or status in IGNORED_STATUSES:
        return False
    for category in _objects(observation.get("category")):
        for coding in _objects(category.get("coding")):
            if (coding.get("system"), coding.get("code")) == VITAL_SIGNS:
                return True
    wanted = set(codes)
    any_system = {c for s, c in wanted if not s}
    concepts = [observation.get("code")] + [c.get("code") for c in _objects(observation.get("component"))]
    for concept in concepts:
        for coding in _objects(concept.get("coding") if isinstance(concept, dict) else None):
            code, system = coding.get("code"), coding.get("system")
            if isinstance(code, str) and isinstance(system, (str, type(None))) \
                    and ((system, code) in wanted or code in any_system):
                return True
    return False


def handle(notification: Notification, *, source: Source, codes: Iterable[tuple[str, str]],
           debounce: Debouncer, enqueue: Callable[[str], None], events: EventLog | None = None,
           now: datetime | None = None) -> Outcome:
    """Queue one rescoring per patient with a new or changed vital sign (unless one is already waiting).

    With an ``events`` log, a gap in the subscription's event numbers, an event sent without its focus
    (an ``empty`` payload), or an id-only event whose focus could not be read for now (the hospital's
    server failed, even after the client's retries: anything but not found), starts a catch-up: a
    search for Observations changed since the last notification we saw, and a rescoring for each
    patient with a vital sign among them. If that search fails, the catch-up stays owed and the next
    notification tries again; one with more pages than it may read is continued from where it stopped
    by the next notification; a source that cannot be searched at all (NotSupported) is said once, not
    retried. An id-only focus not found (404, 410: deleted) is ignored. The focuses are read before
    the notification is recorded, so that the log counts the unread ones as missed.

    If a patient cannot be queued (``enqueue`` raises: the broker is down), its debounce key is
    released, the catch-up (if this one ran it) stays owed and this notification's events are owed
    too, and the error is raised: see ``EventLog``.
    """
    now = now or datetime.now(timezone.utc)
    outcome = Outcome(events=len(notification.events))
    codes = list(codes)
    patients: dict[str, None] = {}
    resources: list[dict[str, Any] | None] = []
    unread: list[int] = []
    for position, event in enumerate(notification.events):
        resource = event.resource
        if resource is None and event.focus and event.focus.startswith("Observation/"):
            if not isinstance(source, ServerSource):      # a folder cannot read one resource: said in the answer
                outcome.unreadable_source += 1
            try:
                resource = _fetch(source, event.focus)    # id-only payload: read it from the source
            except UpstreamNotFound:
                outcome.gone += 1
            except FhirAiError as exc:
                if events is not None:                    # without a log nothing catches it up: ignored
                    unread.append(position)
                    outcome.unread_reason = outcome.unread_reason or exc.message
        resources.append(resource)
    outcome.unread = len(unread)
    gap, previous, outcome.restarted = (events.enter(notification, now, unread) if events is not None
                                        else (None, None, False))
    queuing = False
    try:
        if events is not None and gap is not None:
            outcome.missed = gap.missed
            log.warning("Subscription/%s: %d event(s) missed or sent without their focus; catching up on "
                        "Observations changed since %s", notification.subscription, gap.missed,
                        format_datetime(gap.since))
            try:
                found = catch_up(source, gap.since, codes, now=now)
                outcome.recovered, outcome.recovery_resumes = found.patients, found.resume
                outcome.recovery_skipped = found.skipped
                patients.update(dict.fromkeys(outcome.recovered))
                if found.resume is not None:
                    log.warning("Subscription/%s: the catch-up search read as many pages as it may; continued "
                                "from %s with the next notification", notification.subscription,
                                format_datetime(found.resume))
            except NotSupported as exc:    # never possible with this source: retrying would report the gap forever
                outcome.recovery_failed = exc.message
                log.error("Subscription/%s: %d missed event(s) cannot be caught up: %s", notification.subscription,
                          gap.missed, exc.message)
            except FhirAiError as exc:
                outcome.recovery_failed, outcome.recovery_retried = exc.message, True
                log.error("Subscription/%s: catch-up after missed events failed (%s); tried again with the next "
                          "notification", notification.subscription, type(exc).__name__)
        for position, resource in enumerate(resources):
            if position in unread:                            # counted as missed: the catch-up finds it
                continue
            patient = subject_patient(resource)
            if resource is None or not patient or not is_vital_sign(resource, codes):
                outcome.ignored += 1
                continue
            patients[patient] = None
        queuing = True
        for patient in patients:
            if debounce.claim(patient):
                try:
                    enqueue(patient)
                except Exception:
                    _quietly(debounce.release, patient)     # not queued: the next try must not find it waiting
                    raise
                outcome.queued.append(patient)
            else:
                outcome.debounced.append(patient)
    except Exception:
        # Recorded as received but not (all) queued: whether the hospital's server sends it again or
        # gives up on it, a later notification's catch-up finds its patients (and those of this catch-up).
        if events is not None:
            if gap is not None and queuing:
                # The queue failed: the next notification may run the catch-up at once. Anything else
                # (a bug, data nobody foresaw) keeps the claim until its lease runs out, so a catch-up
                # that fails every time costs one failure per lease, not every notification.
                _quietly(events.settle, notification.subscription, gap, False)
            since = previous or now                   # when the log last moved before this notification,
            opened = EventLog.opening(notification.events, now)
            if opened is not None:                    # or when its events happened, if earlier (a backlog)
                since = min(since, opened)
            if notification.events:
                _quietly(events.owe, notification, since)
            log.error("Subscription/%s: the notification's patients could not all be queued; a catch-up of its "
                      "%d event(s) is owed", notification.subscription, len(notification.events))
        raise
    if events is not None and gap is not None:    # only once queued: a failure above leaves it owed
        events.settle(notification.subscription, gap,
                      done=not outcome.recovery_retried and outcome.recovery_resumes is None,
                      resume=outcome.recovery_resumes)
    log.info("Subscription/%s: %d event(s), %d rescoring(s) queued, %d debounced, %d ignored, %d focus(es) "
             "left to the catch-up", notification.subscription, outcome.events, len(outcome.queued),
             len(outcome.debounced), outcome.ignored, outcome.unread)
    return outcome


def _quietly(call: Callable[..., Any], *args: Any) -> None:
    """Clean-up after a failure: one that fails as well is logged, and the first failure is raised."""
    try:
        call(*args)
    except Exception as exc:
        log.error("clean-up after a failed notification failed too (%s)", type(exc).__name__)


def _fetch(source: Source, reference: str) -> dict[str, Any] | None:
    """An id-only event's focus; None if the source cannot read single resources (a folder). Raises
    the client's error if it could not be read (UpstreamNotFound: it is gone)."""
    if not isinstance(source, ServerSource):
        log.warning("id-only notification for %s, but the source cannot read single resources", reference)
        return None
    try:
        return source.client.get(reference)
    except FhirAiError as exc:
        log.warning("id-only notification: %s could not be read (%s)", reference, type(exc).__name__)
        raise
