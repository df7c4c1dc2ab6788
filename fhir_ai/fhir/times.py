"""FHIR date/dateTime/instant parsing and formatting, always as aware UTC datetimes."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

UTC = timezone.utc
# Open ends of a Period; aware so they compare with everything else we produce.
MIN_TIME = datetime.min.replace(tzinfo=UTC)
MAX_TIME = datetime.max.replace(tzinfo=UTC)

# Only for what fromisoformat refuses: leap second 60 and odd spacing. FHIR allows up to
# 9 fraction digits (https://hl7.org/fhir/R4/datatypes.html#instant); Python keeps 6.
_FALLBACK = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?\s*(Z|[+-]\d{2}:\d{2})?$")


def _partial(s: str) -> tuple[datetime, datetime] | None:
    """The [start, next start) of a year ('2024') or year-month ('2024-05') date, else None."""
    try:
        if len(s) == 4:
            year = int(s)
            return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
        if len(s) == 7 and s[4] == "-":
            year, month = int(s[:4]), int(s[5:])
            start = datetime(year, month, 1, tzinfo=UTC)
            if month == 12:
                return start, datetime(year + 1, 1, 1, tzinfo=UTC)
            return start, datetime(year, month + 1, 1, tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"not a FHIR date: {s!r}") from exc
    return None


def _slow_parse(s: str) -> datetime:
    match = _FALLBACK.match(s)
    if not match:
        raise ValueError(f"not a FHIR dateTime: {s!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    # A leap second (":60") is legal FHIR; fold it into the last representable instant.
    sec = min(int(second or 0), 59)
    if zone is None:
        raise ValueError(f"FHIR dateTime with a time must carry a time zone: {s!r}")
    tz = UTC if zone == "Z" else timezone(
        (1 if zone[0] == "+" else -1) * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    return datetime(int(year), int(month), int(day), int(hour), int(minute), sec, micro, tzinfo=tz)


def parse_datetime(s: str) -> datetime:
    """Parse a FHIR date, dateTime or instant into an aware UTC datetime.

    Partial dates ('2024', '2024-05', '2024-05-06') mean the start of that period, in UTC.
    A time without an offset is meaningless in FHIR (the spec requires one) and raises
    ValueError rather than guessing the server's zone. Anything unreadable raises ValueError, whatever it
    is (a number, a list, '0001-01-01T00:00:00+01:00' before the first representable instant), so that
    callers reading upstream data need to catch only that.
    """
    if not isinstance(s, str):
        raise ValueError(f"not a FHIR date: a {type(s).__name__}, not a string")
    if len(s) <= 7:
        bounds = _partial(s)
        if bounds is None:
            raise ValueError(f"not a FHIR date: {s!r}")
        return bounds[0]
    try:
        dt = datetime.fromisoformat(s)  # the fast path: C code, handles 'Z' and offsets
    except ValueError:
        dt = _slow_parse(s)
    if dt.tzinfo is None:
        if len(s) == 10:  # date only
            return dt.replace(tzinfo=UTC)
        raise ValueError(f"FHIR dateTime with a time must carry a time zone: {s!r}")
    try:
        return dt.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"not a representable FHIR dateTime: {s!r}") from exc


def datetime_range(s: str) -> tuple[datetime, datetime]:
    """The inclusive [first, last] instants a FHIR date/dateTime stands for.

    '2024-05' covers all of May; a full dateTime covers just itself. Servers compare search
    prefixes (ge, le) against this range (https://hl7.org/fhir/R4/search.html#prefix).
    """
    tick = timedelta(microseconds=1)
    if not isinstance(s, str):
        raise ValueError(f"not a FHIR date: a {type(s).__name__}, not a string")
    if len(s) <= 7:
        bounds = _partial(s)
        if bounds is None:
            raise ValueError(f"not a FHIR date: {s!r}")
        return bounds[0], bounds[1] - tick
    start = parse_datetime(s)
    if len(s) == 10:
        return start, start + timedelta(days=1) - tick
    return start, start


def to_epoch(s: str) -> float:
    """Seconds since 1970-01-01T00:00:00Z for a FHIR date/dateTime/instant."""
    return parse_datetime(s).timestamp()


def format_datetime(dt: datetime) -> str:
    """A FHIR instant in UTC ('2024-05-06T01:02:03Z', fraction only when there is one)."""
    if dt.tzinfo is None:
        raise ValueError("refusing to format a naive datetime: its time zone is unknown")
    dt = dt.astimezone(UTC)
    text = dt.replace(tzinfo=None, microsecond=0).isoformat()   # 'YYYY-MM-DDTHH:MM:SS' (years zero-padded)
    if dt.microsecond:
        text += f".{dt.microsecond:06d}".rstrip("0")
    return text + "Z"


def effective_time(observation: dict[str, Any]) -> Any:
    """When an Observation happened: effective[x] (Period end, else start), else issued.

    The first of these that is there (not absent or null) decides, as sent: from a server that sends invalid
    FHIR this may be something other than a string (false, 0, an object; an effectivePeriod that is not an
    object comes back whole), which callers treat as unreadable. An effective[x] that is there but cannot be
    read makes the Observation's time unreadable: it never falls through to ``issued`` (a different time).
    """
    value = observation.get("effectiveDateTime")
    if value is None:
        value = observation.get("effectiveInstant")
    if value is not None:
        return value
    period = observation.get("effectivePeriod")
    if period is not None:
        if period.__class__ is not dict:
            return period
        value = period.get("end")
        if value is None:
            value = period.get("start")
        if value is not None:
            return value
    return observation.get("issued")
