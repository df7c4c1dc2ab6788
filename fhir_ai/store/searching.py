"""A parsed FHIR search → SQL over the stored resources, with keyset paging that survives new writes."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from sqlalchemy import ColumnElement, and_, exists, false, func, not_, or_, select, true
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from ..search.params import (Cursor, Filter, HistoryCursor, HistoryQuery, SearchQuery, carried_total,
                             echo_digest)
from ..search.values import DateValue, NumberValue, Reference, Token
from .tables import AssessmentRow
from .trail_tables import (AssessmentVersionRow, AuditEventRow, ProvenanceEntityRow, ProvenanceRow, SearchIndexRow,
                           probes_by_seq)


@dataclass(frozen=True)
class Spec:
    row: type
    sort: str                                              # attribute _sort=date orders by
    dates: dict[str, tuple[str, str | None]]               # param → (start, end) attributes; end None: instant


SPECS = {
    "RiskAssessment": Spec(AssessmentRow, "sort_date",
                           {"date": ("occurrence", "occurrence_end"), "_lastUpdated": ("last_updated", None)}),
    "Provenance": Spec(ProvenanceRow, "recorded",
                       {"recorded": ("recorded", None), "_lastUpdated": ("last_updated", None)}),
    "AuditEvent": Spec(AuditEventRow, "recorded", {"date": ("recorded", None), "_lastUpdated": ("recorded", None)}),
}


@dataclass
class Page:
    total: int
    resources: list[dict[str, Any]]
    next_cursor: Cursor | HistoryCursor | None


def utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def date_clause(start: Any, end: Any | None, value: DateValue) -> ColumnElement[bool]:
    """https://hl7.org/fhir/R4/search.html#prefix: the target range [start, end) against the value's range
    (for ap the widened range of values.parse_date, which the target only needs to overlap)."""
    low, high = value.low, value.high
    ends_within = end <= high if end is not None else start < high
    reaches_above = end > high if end is not None else start >= high
    contained = and_(start >= low, ends_within)
    clauses = {"eq": contained, "ne": not_(contained), "gt": reaches_above, "lt": start < low,
               "ge": or_(reaches_above, contained), "le": or_(start < low, contained),
               "sa": start >= high, "eb": end <= low if end is not None else start < low,
               # ap: overlap; a Period without an end runs on (https://hl7.org/fhir/R4/datatypes.html#Period)
               "ap": and_(start < high, or_(end.is_(None), end > low) if end is not None else start >= low)}
    return and_(start.is_not(None), clauses[value.prefix])


def number_clause(column: Any, value: NumberValue) -> ColumnElement[bool]:
    v = value.value
    in_range = and_(column >= value.low, column < value.high)
    slack = abs(v) * 0.1
    return {"eq": in_range, "ne": not_(in_range), "gt": column > v, "lt": column < v, "ge": column >= v,
            "le": column <= v, "sa": column > v, "eb": column < v,
            "ap": and_(column >= v - slack, column <= v + slack)}[value.prefix]


def token_clause(value: Token) -> ColumnElement[bool]:
    parts = []
    if value.system == "":
        parts.append(SearchIndexRow.system.is_(None))
    elif value.system is not None:
        parts.append(SearchIndexRow.system == value.system)
    if value.code is not None:
        parts.append(SearchIndexRow.code == value.code)
    return and_(true(), *parts)


STATUS_SYSTEM = "http://hl7.org/fhir/observation-status"     # RiskAssessment.status's code system


def column_token_clause(column: Any, item: Filter) -> ColumnElement[bool]:
    """A token parameter read from a column that always holds a code of STATUS_SYSTEM (``status``)."""
    if item.modifier == "missing":
        return false() if item.values[0] else true()            # a status is never missing
    alternatives = [column == v.code if v.code is not None else true() for v in item.values
                    if v.system is None or v.system == STATUS_SYSTEM]
    matched = or_(false(), *alternatives)
    return not_(matched) if item.modifier == "not" else matched


def reference_clause(value: Reference) -> ColumnElement[bool]:
    if value.type is None:
        return SearchIndexRow.code == value.id
    return and_(SearchIndexRow.system == value.type, SearchIndexRow.code == value.id)


def entity_clause(value: Reference) -> ColumnElement[bool]:
    """``reference_clause`` on provenance_entity (Provenance?entity=: its own table, trail_tables)."""
    if value.type is None:
        return ProvenanceEntityRow.reference_id == value.id
    return and_(ProvenanceEntityRow.reference_id == value.id, ProvenanceEntityRow.reference_type == value.type)


def filter_clause(resource_type: str, key: Any, item: Filter, *, by_seq: bool = False) -> ColumnElement[bool]:
    """``key``: the searched table's id; its index rows are found by the row's ``seq`` (``by_seq``) or id."""
    param, spec = item.param, SPECS[resource_type]
    if param.kind == "id":
        return key.in_(item.values)
    if param.kind == "date":
        start_name, end_name = spec.dates[param.name]
        start = getattr(spec.row, start_name)
        end = getattr(spec.row, end_name) if end_name else None
        if item.modifier == "missing":
            return start.is_(None) if item.values[0] else start.is_not(None)
        return or_(false(), *[date_clause(start, end, v) for v in item.values])
    if param.column:
        return column_token_clause(getattr(spec.row, param.column), item)
    name = param.key + (":identifier" if item.modifier == "identifier" else "")
    references = reference_clause
    if resource_type == "Provenance" and name == "entity":          # its own table, probed by seq everywhere
        references = entity_clause

        def indexed(condition: ColumnElement[bool]) -> ColumnElement[bool]:
            return exists().where(ProvenanceEntityRow.provenance_seq == spec.row.seq, condition)
    else:
        probe = SearchIndexRow.resource_seq == spec.row.seq if by_seq else SearchIndexRow.resource_id == key

        def indexed(condition: ColumnElement[bool]) -> ColumnElement[bool]:
            return exists().where(SearchIndexRow.resource_type == resource_type, probe,
                                  SearchIndexRow.param == name, condition)

    if item.modifier == "missing":
        return not_(indexed(true())) if item.values[0] else indexed(true())
    if param.kind == "number":
        return or_(false(), *[indexed(number_clause(SearchIndexRow.number, v)) for v in item.values])
    if param.kind == "token" or item.modifier == "identifier":
        matched = or_(false(), *[indexed(token_clause(v)) for v in item.values])
        return not_(matched) if item.modifier == "not" else matched
    return or_(false(), *[indexed(references(v)) for v in item.values])


def run(session: Session, query: SearchQuery) -> Page:
    spec = SPECS[query.resource_type]
    row: Any = spec.row
    key: InstrumentedAttribute[Any] = row.id
    seq: InstrumentedAttribute[int] = row.seq
    by_seq = probes_by_seq(session.get_bind().dialect.name)
    where = [filter_clause(query.resource_type, key, f, by_seq=by_seq) for f in query.filters]
    # The high-water mark fixes the result set at the first page: rows stored later never shift
    # the pages that follow (nothing skipped, nothing shown twice) and `total` stays the same.
    high = query.cursor.high if query.cursor else (session.scalar(select(func.max(seq))) or 0)
    where.append(seq <= high)
    # Later pages: the first page's total (the high-water mark fixed the set), not a count over again.
    # (A withdrawal rewrites a row's lastUpdated in place, so a _lastUpdated search can gain or lose a
    # row between pages; the total stays the one the first page reported.)
    total = carried_total(query.cursor, query.echo)
    if total is None:
        total = session.scalar(select(func.count()).select_from(row).where(*where)) or 0
    if query.summary_count or query.count == 0:
        return Page(total, [], None)
    sort_column = getattr(row, spec.sort)
    ascending = query.sort is not None and not query.sort.startswith("-")
    if query.cursor is not None:
        where.append(_after(query.cursor, sort_column if query.sort else None, seq, ascending))
    if query.sort is None:
        order = [seq.desc()]
    elif ascending:
        order = [sort_column.asc(), seq.asc()]
    else:
        order = [sort_column.desc(), seq.desc()]
    rows = list(session.scalars(select(row).where(*where).order_by(*order).limit(query.count + 1)))
    next_cursor = None
    if len(rows) > query.count:
        rows = rows[:query.count]
        last = rows[-1]
        next_cursor = Cursor(high, utc(getattr(last, spec.sort)).isoformat() if query.sort else None, last.seq,
                             query.now, total, echo_digest(query.echo))
    return Page(total, [orjson.loads(r.resource) for r in rows], next_cursor)


def _after(cursor: Cursor, sort_column: Any | None, seq: Any, ascending: bool) -> ColumnElement[bool]:
    if sort_column is None or cursor.key is None:
        return seq > cursor.seq if ascending else seq < cursor.seq
    key = datetime.fromisoformat(cursor.key)
    if ascending:
        return or_(sort_column > key, and_(sort_column == key, seq > cursor.seq))
    return or_(sort_column < key, and_(sort_column == key, seq < cursor.seq))


def history(session: Session, query: HistoryQuery) -> Page:
    """Every RiskAssessment version the query selects, newest first (lastUpdated, then id and version),
    keyset-paged below the first page's high-water lastUpdated."""
    row = AssessmentVersionRow
    high = query.cursor.high if query.cursor else session.scalar(select(func.max(row.last_updated)))
    if high is None:
        return Page(0, [], None)
    where: list[ColumnElement[bool]] = [row.last_updated <= high]
    if query.since is not None:
        where.append(row.last_updated >= query.since)
    if query.at is not None:
        # Current from its lastUpdated until the next version's: that span must meet [low, high).
        low, up = query.at
        newer = aliased(AssessmentVersionRow)
        where += [row.last_updated < up,
                  not_(exists().where(newer.id == row.id, newer.version_id == row.version_id + 1,
                                      newer.last_updated <= low))]
    total = carried_total(query.cursor, query.echo)
    if total is None:
        total = session.scalar(select(func.count()).select_from(row).where(*where)) or 0
    if query.count == 0:
        return Page(total, [], None)
    if query.cursor is not None:
        c = query.cursor
        where.append(or_(row.last_updated < c.key,
                         and_(row.last_updated == c.key,
                              or_(row.id < c.id, and_(row.id == c.id, row.version_id < c.version)))))
    rows = list(session.execute(select(row.last_updated, row.id, row.version_id, row.resource).where(*where)
                                .order_by(row.last_updated.desc(), row.id.desc(), row.version_id.desc())
                                .limit(query.count + 1)))
    next_cursor = None
    if len(rows) > query.count:
        rows = rows[:query.count]
        last = rows[-1]
        next_cursor = HistoryCursor(utc(high), utc(last.last_updated), last.id, last.version_id, total,
                                    echo_digest(query.echo))
    return Page(total, [orjson.loads(r.resource) for r in rows], next_cursor)
