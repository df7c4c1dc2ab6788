"""Search parameter values: prefixes, the range a date or number stands for, tokens and references.

https://hl7.org/fhir/R4/search.html#prefix — a date or number given with some precision means the
whole range of values that round to it (``2026-11`` is all of November, ``0.25`` is [0.245, 0.255)).
``ap`` ("approximately") leaves the range to the server: see ``parse_date`` and ``parse_number``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Callable

from ..fhir.ids import ID as _ID

UTC = timezone.utc
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
NUMBER_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?")
_NUMBER = re.compile(r"[+-]?(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")
_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
AP_FRACTION = 0.1       # ap on a date: ± this fraction of the time between the value and now
# What "now" is for ap on dates; looked up at each parse, so that tests can fix it.
clock: Callable[[], datetime] = lambda: datetime.now(UTC)


@dataclass(frozen=True)
class DateValue:
    prefix: str
    low: datetime        # inclusive
    high: datetime       # exclusive


@dataclass(frozen=True)
class NumberValue:
    prefix: str
    value: float
    low: float           # inclusive: the value's implicit precision range
    high: float          # exclusive


@dataclass(frozen=True)
class Token:
    system: str | None   # None: any system; "": no system
    code: str | None     # None: any code of the system


@dataclass(frozen=True)
class Reference:
    type: str | None     # None: any resource type
    id: str


def split_prefix(text: str, allowed: tuple[str, ...]) -> tuple[str, str]:
    if len(text) > 2 and text[:2] in allowed and not text[:2].isdigit():
        return text[:2], text[2:]
    if len(text) > 2 and text[:2].isalpha():
        raise ValueError(f"{text!r} is no value: a number or date, optionally after a prefix "
                         f"({', '.join(allowed)}); {text[:2]!r} is none of them")
    return "eq", text


def _zone(text: str | None, default: timezone) -> timezone:
    if text is None:
        return default
    if text == "Z":
        return UTC
    sign = 1 if text[0] == "+" else -1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 14 or minutes > 59:
        raise ValueError(f"time zone offset out of range: {text!r}")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def date_range(text: str, default_zone: timezone = UTC) -> tuple[datetime, datetime]:
    """[low, high) in UTC of a FHIR date, dateTime or instant, by the precision it is given with.

    Values without a time zone (partial dates, or a time without offset) are read in
    ``default_zone``: this server's zone is UTC.
    """
    match = _DATE.fullmatch(text)
    if not match:
        raise ValueError(f"not a FHIR date/dateTime: {text!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz = _zone(zone, default_zone)
    y = int(year)
    try:
        if month is None:
            low = datetime(y, 1, 1, tzinfo=tz)
            high = datetime(y + 1, 1, 1, tzinfo=tz) if y < 9999 else _shift(low, timedelta(days=366))
        elif day is None:
            m = int(month)
            low = datetime(y, m, 1, tzinfo=tz)
            high = (datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=tz) if (y, m) != (9999, 12)
                    else _shift(low, timedelta(days=31)))
        elif hour is None:
            low = datetime(y, int(month), int(day), tzinfo=tz)
            high = _shift(low, timedelta(days=1))
        else:
            sec = min(int(second or 0), 59)       # a leap second folds into :59
            micro = int((fraction or "")[:6].ljust(6, "0"))
            low = datetime(y, int(month), int(day), int(hour), int(minute), sec, micro, tzinfo=tz)
            if second is None:
                step = timedelta(minutes=1)
            elif fraction is None:
                step = timedelta(seconds=1)
            else:
                step = timedelta(microseconds=max(1, 10 ** (6 - min(len(fraction), 6))))
            high = _shift(low, step)
    except ValueError as exc:
        raise ValueError(f"not a valid date: {text!r} ({exc})") from exc
    return _utc(low), _utc(high)


def _utc(moment: datetime) -> datetime:
    """``moment`` in UTC, held within the years datetime can hold (0001-01-01T00:00+01:00 is before them)."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return (datetime.min if moment.year == 1 else datetime.max).replace(tzinfo=UTC)


def parse_date(text: str, now: datetime | None = None) -> DateValue:
    """A date search value: its prefix and the [low, high) range it stands for.

    ``ap`` (approximately): the value's own range widened on both sides by 10% of the time between the
    value (the start of its range) and now, the specification's recommendation ("for a date, 10% of the
    gap between now and the date"); a resource matches when its date range overlaps that. So ``ap2026-11-16`` asked on 2026-11-26T00:00Z is 2026-11-15T00:00Z to
    2026-11-18T00:00Z (10 days ago: ± 1 day), and a value at now is just its own precision range.
    ``now`` defaults to ``clock()``.
    """
    prefix, rest = split_prefix(text, DATE_PREFIXES)
    low, high = date_range(rest)
    if prefix == "ap":
        slack = abs((now or clock()) - low) * AP_FRACTION
        low, high = _shift(low, -slack), _shift(high, slack)
    return DateValue(prefix, low, high)


def _shift(moment: datetime, by: timedelta) -> datetime:
    """``moment + by``, held within the years datetime can hold (ap on year 0001 or 9999)."""
    try:
        return moment + by
    except OverflowError:
        return (datetime.min if by < timedelta(0) else datetime.max).replace(tzinfo=UTC)


def parse_number(text: str) -> NumberValue:
    """A number search value with the range of its precision; ``ap`` matches within 10% of the value."""
    prefix, rest = split_prefix(text, NUMBER_PREFIXES)
    match = _NUMBER.fullmatch(rest)
    if not match:
        raise ValueError(f"not a number: {rest!r}")
    try:
        value = Decimal(rest)
        # Half a unit of the last digit given: 0.25 → ±0.005, 100 → ±0.5, 1e2 → ±50.
        digits = len(match.group(2) or "")
        exponent = int(match.group(3) or 0)
        half = Decimal(5) * Decimal(10) ** (exponent - digits - 1)
        out = NumberValue(prefix, float(value), float(value - half), float(value + half))
    except ArithmeticError as exc:           # InvalidOperation, Overflow (1e1000000)...
        raise ValueError(f"not a number this server can compare: {rest!r}") from exc
    if not all(math.isfinite(v) for v in (out.value, out.low, out.high)):
        raise ValueError(f"not a number this server can compare: {rest!r}")
    return out


def split_values(text: str, separator: str = ",") -> list[str]:
    """Split on the separator unless escaped with a backslash (https://hl7.org/fhir/R4/search.html#escaping)."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char if char in ",|$\\" else "\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def parse_token(text: str) -> Token:
    """``code``, ``system|code``, ``|code`` (no system) or ``system|`` (any code of the system)."""
    if not text:
        raise ValueError("empty token")
    pipe = _unescaped_pipe(text)
    if pipe < 0:
        return Token(None, _unescape(text))
    system, code = _unescape(text[:pipe]), _unescape(text[pipe + 1:])
    if not system and not code:
        raise ValueError("a token needs a system or a code")
    return Token(system, code or None)


def _unescaped_pipe(text: str) -> int:
    escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|":
            return i
    return -1


def _unescape(text: str) -> str:
    return re.sub(r"\\([,|$\\])", r"\1", text)


def parse_reference(text: str, *, default_type: str | None = None) -> Reference:
    """``id``, ``Type/id``, ``Type/id/_history/n`` or an absolute URL ending in ``Type/id``."""
    value = text.split("/_history/", 1)[0]
    if "://" in value:
        # An absolute URL: the hospital's server or ours; what identifies the resource is Type/id.
        parts = value.split("/")
        if len(parts) < 5:
            raise ValueError(f"not a resource URL: {text!r}")
        value = "/".join(parts[-2:])
    if "/" in value:
        kind, _, rid = value.partition("/")
        if not _TYPE.fullmatch(kind) or "/" in rid:
            raise ValueError(f"not a reference: {text!r}")
    else:
        kind, rid = default_type, value
    if not _ID.fullmatch(rid):
        raise ValueError(f"not a FHIR id: {rid!r}")
    return Reference(kind, rid)
