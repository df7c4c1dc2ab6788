"""Which search parameters each stored resource type supports, and parsing a query string into filters."""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable, Iterable, TypeVar

import orjson

from ..errors import BadRequest, NotSupported
from . import values
from .values import Reference

T = TypeVar("T")

@dataclass(frozen=True)
class Param:
    """One search parameter: its FHIR type and where the store finds its values."""
    name: str
    kind: str                                  # date | number | token | reference | id
    targets: tuple[str, ...] = ()              # reference: the resource types it may point to
    index: str = ""                            # name in the search index (default: name)
    definition: str = ""                       # canonical URL of the SearchParameter
    column: str = ""                           # a token read from this column of the row, not the index
    documentation: str = ""

    @property
    def key(self) -> str:
        return self.index or self.name


def _std(resource: str, name: str, kind: str, *targets: str, index: str = "") -> Param:
    return Param(name, kind, targets, index, f"http://hl7.org/fhir/SearchParameter/{resource}-{name}")


_COMMON = {
    "_id": Param("_id", "id", definition="http://hl7.org/fhir/SearchParameter/Resource-id"),
    "_lastUpdated": Param("_lastUpdated", "date", definition="http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"),
}

# R4's targets of Provenance-agent and AuditEvent-agent (agent.who): what agent:Practitioner=123 may name.
_AGENT_TYPES = ("Practitioner", "PractitionerRole", "RelatedPerson", "Patient", "Device", "Organization")

PARAMETERS: dict[str, dict[str, Param]] = {
    "RiskAssessment": {
        "condition": _std("RiskAssessment", "condition", "reference", "Condition"),
        "date": Param("date", "date", definition="http://hl7.org/fhir/SearchParameter/clinical-date"),
        "encounter": Param("encounter", "reference", ("Encounter",),
                           definition="http://hl7.org/fhir/SearchParameter/clinical-encounter"),
        "identifier": Param("identifier", "token",
                            definition="http://hl7.org/fhir/SearchParameter/clinical-identifier"),
        "method": _std("RiskAssessment", "method", "token"),
        "patient": Param("patient", "reference", ("Patient",), index="subject",
                         definition="http://hl7.org/fhir/SearchParameter/clinical-patient"),
        "performer": _std("RiskAssessment", "performer", "reference", "Practitioner", "PractitionerRole",
                          "Device"),
        "probability": _std("RiskAssessment", "probability", "number"),
        "risk": _std("RiskAssessment", "risk", "token"),
        "subject": _std("RiskAssessment", "subject", "reference", "Patient", "Group"),
        # Not an R4 parameter of RiskAssessment (R4 defines none for status): ours, so that an EHR can leave
        # out withdrawn assessments (status:not=entered-in-error). The current version's status.
        "status": Param("status", "token", column="status",
                        definition="https://fhir-ai.invalid/SearchParameter/RiskAssessment-status",
                        documentation="the current version's status (observation-status codes), e.g. "
                                      "status:not=entered-in-error"),
        **_COMMON,
    },
    "Provenance": {
        "target": _std("Provenance", "target", "reference"),
        # Not R4's Provenance-patient (Provenance.target.where(resolve() is Patient): a target that IS a Patient,
        # which none of ours is): the patient the target assessment is about, which is what an auditor asks.
        "patient": Param("patient", "reference", ("Patient",),
                         definition="https://fhir-ai.invalid/SearchParameter/Provenance-patient",
                         documentation="the patient the target RiskAssessment is about (its subject), not a "
                                       "target that is a Patient as R4's Provenance-patient"),
        # R4's Provenance-agent (agent.who): the client, by identifier (agent:identifier=), and the user a CDS
        # Hooks call named (agent=Practitioner/123); the model is a contained Device, onBehalfOf is not agent.who.
        "agent": replace(_std("Provenance", "agent", "reference", *_AGENT_TYPES), documentation=(
            "agent.who: the client (agent:identifier=<system>|<client id>) and, for a CDS Hooks call, the user "
            "it named (agent=Practitioner/123)")),
        "entity": _std("Provenance", "entity", "reference"),
        "recorded": _std("Provenance", "recorded", "date"),
        **_COMMON,
    },
    "AuditEvent": {
        "date": _std("AuditEvent", "date", "date"),
        "agent": _std("AuditEvent", "agent", "reference", *_AGENT_TYPES),
        "entity": _std("AuditEvent", "entity", "reference"),
        "action": _std("AuditEvent", "action", "token"),
        "outcome": _std("AuditEvent", "outcome", "token"),
        "subtype": _std("AuditEvent", "subtype", "token"),
        "type": _std("AuditEvent", "type", "token"),
        "patient": _std("AuditEvent", "patient", "reference", "Patient"),
        "address": _std("AuditEvent", "address", "token"),
        **_COMMON,
    },
}

# The date parameter each type sorts by with _sort=date / -date.
SORT_PARAMETER = {"RiskAssessment": "date", "Provenance": "recorded", "AuditEvent": "date"}
CONTROL = {"_count", "_sort", "_summary", "_cursor", "_format", "_total"}
MODIFIERS = {"token": {"not", "missing"}, "reference": {"missing", "identifier"},
             "date": {"missing"}, "number": {"missing"}, "id": set()}
MAX_COUNT = 200
DEFAULT_COUNT = 50


@dataclass
class Filter:
    """One parameter occurrence: its alternatives are ORed; several filters are ANDed."""
    param: Param
    modifier: str | None
    values: list[Any]                     # DateValue | NumberValue | Token | Reference | str | bool


def _pack(data: dict[str, Any]) -> str:
    """A ``_cursor`` value: the JSON of ``data``, base64url without padding."""
    return base64.urlsafe_b64encode(orjson.dumps(data)).decode().rstrip("=")


MAX_VALUES = 100           # values of one parameter ('a,b,c': any of them)
MAX_QUERY_VALUES = 400     # values of all a search's parameters (each one more term for the database)


def _unpack(text: str, make: Callable[[dict[str, Any]], T]) -> T:
    """``make`` applied to what ``_pack`` packed; anything else is a 400 naming ``_cursor``."""
    try:
        data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if not isinstance(data, dict):
            raise ValueError("not a cursor")
        return make(data)
    except (binascii.Error, ValueError, KeyError, TypeError, OverflowError, orjson.JSONDecodeError) as exc:
        raise BadRequest("_cursor is not one this server issued; start the search again",
                         expression="_cursor") from exc


@dataclass
class Cursor:
    """Where the previous page ended: (sort key, seq) of its last row, and the high-water seq; ``now``:
    the instant the first page took as "now" (``ap`` dates are measured from it on every page, so the
    pages of one search all ask the same question)."""
    high: int
    key: str | None
    seq: int
    now: datetime | None = None
    total: int | None = None             # the first page's total: the set is fixed by ``high``
    query: str | None = None             # echo_digest of the search the total was counted for

    def encode(self) -> str:
        data: dict[str, Any] = {"h": self.high, "k": self.key, "s": self.seq}
        if self.now is not None:
            data["n"] = self.now.isoformat()
        if self.total is not None:
            data["t"], data["q"] = self.total, self.query
        return _pack(data)

    @classmethod
    def decode(cls, text: str) -> "Cursor":
        def make(data: dict[str, Any]) -> Cursor:
            now = datetime.fromisoformat(data["n"]) if data.get("n") is not None else None
            if now is not None and now.tzinfo is None:
                raise ValueError("not a cursor")
            if data["k"] is not None and not isinstance(data["k"], str):
                raise ValueError("not a cursor")
            return cls(_position(data["h"]), data["k"], _position(data["s"]), now, *_total(data))
        return _unpack(text, make)


def _position(value: Any) -> int:
    """A storage position (seq, version) from a cursor: a whole number a database column holds."""
    if type(value) is not int or not 0 <= value < 2 ** 63:
        raise ValueError("not a cursor")
    return value


def _total(data: dict[str, Any]) -> tuple[int | None, str | None]:
    total, query = data.get("t"), data.get("q")
    if total is None:
        return None, None
    if type(total) is not int or not 0 <= total < 2 ** 63 or not isinstance(query, str):
        raise ValueError("not a cursor")
    return total, query


def echo_digest(echo: list[tuple[str, str]]) -> str:
    """A short digest of a search's accepted parameters: a cursor's total is used only for the search
    it was counted for (a cursor pasted onto other parameters is counted again)."""
    return hashlib.sha256(orjson.dumps(echo)).hexdigest()[:24]


def carried_total(cursor: "Cursor | HistoryCursor | None", echo: list[tuple[str, str]]) -> int | None:
    """The first page's total from the cursor, when it was counted for these parameters."""
    if cursor is None or cursor.total is None or cursor.query != echo_digest(echo):
        return None
    return cursor.total


@dataclass
class HistoryCursor:
    """Where the previous history page ended: (lastUpdated, id, version) of its last version, and the
    high-water lastUpdated of the first page (versions stored later are not in the pages that follow)."""
    high: datetime
    key: datetime
    id: str
    version: int
    total: int | None = None             # the first page's total: the set is fixed by ``high``
    query: str | None = None             # echo_digest of the history query the total was counted for

    def encode(self) -> str:
        data: dict[str, Any] = {"h": self.high.isoformat(), "k": self.key.isoformat(), "i": self.id,
                                "v": self.version}
        if self.total is not None:
            data["t"], data["q"] = self.total, self.query
        return _pack(data)

    @classmethod
    def decode(cls, text: str) -> "HistoryCursor":
        def make(data: dict[str, Any]) -> HistoryCursor:
            high, key = datetime.fromisoformat(data["h"]), datetime.fromisoformat(data["k"])
            if high.tzinfo is None or key.tzinfo is None or not isinstance(data["i"], str):
                raise ValueError("not a cursor")
            return cls(high, key, data["i"], _position(data["v"]), *_total(data))
        return _unpack(text, make)


@dataclass
class SearchQuery:
    resource_type: str
    filters: list[Filter] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    sort: str | None = None              # None: newest stored first; "date" / "-date"
    summary_count: bool = False
    cursor: Cursor | None = None
    ignored: list[str] = field(default_factory=list)
    echo: list[tuple[str, str]] = field(default_factory=list)   # the accepted parameters, for links
    now: datetime | None = None          # "now" for ap dates: the first page's, carried by the cursor


def _value(param: Param, modifier: str | None, raw: str, now: datetime | None = None) -> Any:
    if modifier == "missing":
        if raw not in ("true", "false"):
            raise ValueError(":missing takes true or false")
        return raw == "true"
    if param.kind == "date":
        return values.parse_date(raw, now)
    if param.kind == "number":
        return values.parse_number(raw)
    if param.kind == "token" or modifier == "identifier":
        return values.parse_token(raw)
    if param.kind == "id":
        if not values._ID.fullmatch(raw):
            raise ValueError(f"not a FHIR id: {raw!r}")
        return raw
    ref = values.parse_reference(raw, default_type=modifier)
    if modifier and ref.type != modifier:
        raise ValueError(f"reference {raw!r} is not a {modifier}")
    if param.targets and ref.type is not None and ref.type not in param.targets:
        raise ValueError(f"{param.name} refers to {', '.join(param.targets)}, not {ref.type}")
    if len(param.targets) == 1 and ref.type is None:
        ref = Reference(param.targets[0], ref.id)
    return ref


def whole_number_param(name: str, raw: str, low: int, high: int) -> int:
    """A parameter that must be a whole number from ``low`` to ``high`` (ASCII digits); else 400 naming it."""
    if not (raw.isascii() and raw.isdigit()):        # int() would take '+5', ' 5', '1_0' and '٣'
        raise BadRequest(f"{name} must be a whole number", expression=name)
    value = int(raw)
    if not low <= value <= high:
        raise BadRequest(f"{name} must lie between {low} and {high}", expression=name)
    return value


def parse_query(resource_type: str, args: Iterable[tuple[str, str]], *, lenient: bool = False) -> SearchQuery:
    """Every parameter checked; unknown or malformed ones → BadRequest naming them, unless lenient
    (then they are ignored and listed in ``ignored``)."""
    supported = PARAMETERS[resource_type]
    query = SearchQuery(resource_type)
    args = list(args)
    # The cursor first, wherever it stands: a later page measures ap dates from the first page's now.
    for name, raw in args:
        if name == "_cursor":
            query.cursor = Cursor.decode(raw)
    query.now = (query.cursor.now if query.cursor else None) or values.clock()
    for name, raw in args:
        base, _, modifier = name.partition(":")
        try:
            if base in CONTROL and not modifier:
                _control(query, base, raw)
                continue
            if base in ("_include", "_revinclude"):
                raise NotSupported(f"{base} is not supported: this server stores no patients or other "
                                   "resources to include", expression=name)
            param = supported.get(base)
            if param is None:
                raise BadRequest(f"unknown search parameter {name!r}; {resource_type} supports "
                                 f"{', '.join(sorted(supported))}", expression=name)
            mod = modifier or None
            if mod is not None and mod not in MODIFIERS[param.kind] and not (
                    param.kind == "reference" and mod in param.targets):
                raise BadRequest(f"modifier :{mod} is not supported on {base}", expression=name)
            alternatives = [raw] if mod == "missing" else values.split_values(raw)
            asked = len(alternatives) + sum(len(f.values) for f in query.filters)
            if len(alternatives) > MAX_VALUES or asked > MAX_QUERY_VALUES:
                raise BadRequest(f"{name}: at most {MAX_VALUES} values in one parameter and {MAX_QUERY_VALUES} in "
                                 "one search", expression=name)
            try:
                parsed = [_value(param, mod, alt, query.now) for alt in alternatives]
            except ValueError as exc:
                raise BadRequest(f"{name}: {exc}", expression=name) from exc
            query.filters.append(Filter(param, mod, parsed))
            query.echo.append((name, raw))
        except (BadRequest, NotSupported):
            if not lenient or base in ("_count", "_cursor"):
                raise
            query.ignored.append(name)
    return query


def _control(query: SearchQuery, name: str, raw: str) -> None:
    if name == "_count":
        query.count = whole_number_param("_count", raw, 0, MAX_COUNT)
        query.echo.append((name, raw))
    elif name == "_sort":
        field_name = SORT_PARAMETER[query.resource_type]
        if raw not in (field_name, f"-{field_name}"):
            raise BadRequest(f"_sort supports {field_name} and -{field_name}", expression="_sort")
        query.sort = raw
        query.echo.append((name, raw))
    elif name == "_summary":
        if raw != "count":
            raise BadRequest("_summary supports count only", expression="_summary")
        query.summary_count = True
        query.echo.append((name, raw))
    elif name == "_total":
        if raw not in ("none", "estimate", "accurate"):
            raise BadRequest("_total must be none, estimate or accurate", expression="_total")
    # _cursor is decoded before the other parameters (parse_query); _format is checked by the API
    # layer (JSON only).


# FHIR instant (https://hl7.org/fhir/R4/datatypes.html#instant): to the second at least, with a zone.
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})")


@dataclass
class HistoryQuery:
    """A type-level history (https://hl7.org/fhir/R4/http.html#history), newest version first."""
    since: datetime | None = None                        # versions stored at or after this instant
    at: tuple[datetime, datetime] | None = None          # versions current at some time in [low, high)
    count: int = DEFAULT_COUNT
    cursor: HistoryCursor | None = None
    echo: list[tuple[str, str]] = field(default_factory=list)   # the accepted parameters, for links


def parse_history(args: Iterable[tuple[str, str]], *, lenient: bool = False) -> HistoryQuery:
    """``_since`` (instant), ``_at`` (date or dateTime, its precision is the period), ``_count``, ``_cursor``;
    a malformed one → BadRequest naming it; an unknown one too, unless lenient (then it is ignored)."""
    query = HistoryQuery()
    for name, raw in args:
        if name == "_cursor":
            query.cursor = HistoryCursor.decode(raw)
        elif name in ("_since", "_at", "_count"):
            _history_control(query, name, raw)
            query.echo.append((name, raw))
        elif name != "_format" and not lenient:       # _format: checked by the API layer (JSON only)
            raise BadRequest(f"unknown history parameter {name!r}; history supports _since, _at and _count",
                             expression=name)
    return query


def _history_control(query: HistoryQuery, name: str, raw: str) -> None:
    if name == "_since":
        if not _INSTANT.fullmatch(raw):
            raise BadRequest("_since must be a FHIR instant, e.g. 2026-11-20T08:00:00Z", expression="_since")
        query.since = _date_range("_since", raw)[0]
    elif name == "_at":
        query.at = _date_range("_at", raw)
    else:
        query.count = whole_number_param("_count", raw, 0, MAX_COUNT)


def _date_range(name: str, raw: str) -> tuple[datetime, datetime]:
    try:
        return values.date_range(raw)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}", expression=name) from exc
