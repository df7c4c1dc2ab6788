"""`fhir-ai audit verify`: walk the audit hash chain and check every stored resource against it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..fhir import times
from . import indexing
from .audit import CARD_EVENT_SYSTEM, GENESIS, chain_values, link_hash, row_digest, sha256_of
from .searching import utc
from .tables import AssessmentRow, CdsCardEventRow
from .trail_tables import (AssessmentVersionRow, AuditEventRow, ChainHeadRow, ProvenanceRow, SearchIndexRow,
                           probes_by_seq)

BATCH = 500
MAX_PROBLEMS = 100


@dataclass
class Report:
    events: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    versions: int = 0
    provenance: int = 0
    card_events: int = 0                 # CDS card events checked against the trail
    card_events_before: int = 0          # stored before card events were audited (nothing to check them by)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


def _index_set(entries: list[indexing.Entry]) -> set[tuple[Any, ...]]:
    return {(p, s, c, None if n is None else round(n, 9)) for p, s, c, n in entries}


def _check_event(row: AuditEventRow, expected_seq: int, prev: str, report: Report,
                 stored_index: set[tuple[Any, ...]]) -> dict[str, Any] | None:
    where = f"AuditEvent seq {row.seq} ({row.id})"
    if row.seq != expected_seq:
        report.problem(f"{where}: expected seq {expected_seq}: events are missing or were inserted")
    try:
        event = orjson.loads(row.resource)
    except orjson.JSONDecodeError:
        report.problem(f"{where}: stored JSON is unreadable")
        return None
    chain = chain_values(event)
    if row.prev_hash != prev or chain.get("previous") != prev:
        report.problem(f"{where}: does not link to the previous event (chain broken)")
    digest = link_hash(row.seq, row.prev_hash, event)
    if digest != row.hash or chain.get("hash") != row.hash or chain.get("sequence") != str(row.seq):
        report.problem(f"{where}: content does not match its hash (altered)")
    agent = ((event.get("agent") or [{}])[0].get("who") or {}).get("identifier", {}).get("value")
    if (event.get("id") != row.id or event.get("action") != row.action or event.get("outcome") != row.outcome
            or agent != row.agent or event.get("recorded") != _format(row.recorded)):
        report.problem(f"{where}: searchable columns differ from the event (altered)")
    if _index_set(indexing.audit_event(event)) != stored_index:
        report.problem(f"{where}: search index differs from the event (altered)")
    return event


def _format(value: Any) -> str:
    return times.format_datetime(utc(value))


def _index_rows(session: Session, events: list[AuditEventRow]) -> dict[str, set[tuple[Any, ...]]]:
    """The stored search index rows of ``events``, by event id, found as searches find them: by seq
    (``probes_by_seq``) or by id. A row whose other key (id, or seq) is not its event's counts as foreign:
    that event's rows then differ from what the event gives (searches would find it under another event)."""
    out: dict[str, set[tuple[Any, ...]]] = {e.id: set() for e in events}
    seq_of = {e.id: e.seq for e in events}
    id_of = {e.seq: e.id for e in events}
    by_seq = probes_by_seq(session.get_bind().dialect.name)
    found = SearchIndexRow.resource_seq.in_(list(id_of)) if by_seq else SearchIndexRow.resource_id.in_(list(out))
    rows = session.execute(select(SearchIndexRow.resource_id, SearchIndexRow.resource_seq, SearchIndexRow.param,
                                  SearchIndexRow.system, SearchIndexRow.code, SearchIndexRow.number)
                           .where(SearchIndexRow.resource_type == "AuditEvent", found))
    for rid, seq, param, system, code, number in rows:
        owner = id_of[seq] if by_seq else rid
        entry = (param, system, code, None if number is None else round(number, 9))
        out[owner].add(entry if rid == owner and seq == seq_of[owner] else ("foreign", rid, seq, *entry))
    return out


def verify(session: Session, *, anchor: tuple[int, str] | None = None,
           progress: Callable[[int], None] | None = None) -> Report:
    """Every check, all problems listed (up to 100): the chain (order, links, hashes), the events'
    searchable columns and index, the head row, and that every stored assessment version and
    Provenance is exactly what its audit event recorded (nothing altered, added or removed)."""
    report = Report()
    prev, expected_seq, last_seq = GENESIS, 1, 0
    recorded: dict[str, str] = {}        # 'RiskAssessment/x/_history/1' → sha256 the event recorded
    cards: dict[int, list[str]] = {}     # cds_card_event id → sha256 each event that names it recorded
    while True:
        rows = list(session.scalars(select(AuditEventRow).where(AuditEventRow.seq > last_seq)
                                    .order_by(AuditEventRow.seq).limit(BATCH)))
        if not rows:
            break
        index = _index_rows(session, rows)
        for row in rows:
            event = _check_event(row, expected_seq, prev, report, index.get(row.id, set()))
            for entity in (event or {}).get("entity") or []:
                for detail in entity.get("detail") or []:
                    if detail.get("type") != "sha256":
                        continue
                    what = entity.get("what") or {}
                    identifier = what.get("identifier") or {}
                    if identifier.get("system") == CARD_EVENT_SYSTEM and str(identifier.get("value")).isdigit():
                        cards.setdefault(int(identifier["value"]), []).append(detail["valueString"])
                    elif "reference" in what:
                        recorded[what["reference"]] = detail["valueString"]
            if anchor and row.seq == anchor[0] and row.hash != anchor[1]:
                report.problem(f"AuditEvent seq {row.seq}: hash differs from the anchor you recorded")
            prev, expected_seq, last_seq = row.hash, row.seq + 1, row.seq
            report.events += 1
        if progress:
            progress(len(rows))
    if anchor and anchor[0] > last_seq:
        report.problem(f"the chain ends at seq {last_seq}, before the anchor {anchor[0]}: events were removed")
    head = session.get(ChainHeadRow, 1)
    report.head_seq, report.head_hash = last_seq, prev
    if head is None or head.seq != last_seq or head.hash != prev:
        report.problem("the chain head does not match the last event: events were removed or added")
    _check_stored(session, recorded, report)
    _check_card_events(session, cards, report)
    return report


def _check_card_events(session: Session, recorded: dict[int, list[str]], report: Report) -> None:
    """Every CDS card event (cards issued, feedback) against the sha256 its AuditEvent recorded. Rows with ids
    below the first audited one (stored before card events were audited) are counted apart: nothing records
    them. Any later row without an event was added behind the trail's back; an id two events record was
    removed and given again (SQLite reuses the highest id once its row is gone; nothing deletes card events)."""
    first = min(recorded) if recorded else None
    seen: set[int] = set()
    for row_id, digests in recorded.items():
        if len(digests) > 1:
            report.problem(f"CDS card event {row_id}: recorded by {len(digests)} audit events (a row was removed "
                           "and its id given to another)")
    for row in session.scalars(select(CdsCardEventRow).order_by(CdsCardEventRow.id)).yield_per(BATCH):
        seen.add(row.id)
        if row.id in recorded:
            report.card_events += 1
            if row_digest(row) != recorded[row.id][-1]:
                report.problem(f"CDS card event {row.id}: content differs from what the audit trail recorded "
                               "(altered)")
        elif (first is not None and row.id > first) or row.id <= 0:      # no database gives an id <= 0
            report.problem(f"CDS card event {row.id}: stored without an audit event (added behind the trail's back)")
        else:
            report.card_events_before += 1
    for row_id in sorted(set(recorded) - seen):
        report.problem(f"CDS card event {row_id}: recorded in the audit trail but no longer stored (removed)")


def _check_stored(session: Session, recorded: dict[str, str], report: Report) -> None:
    seen: set[str] = set()
    latest: dict[str, int] = {}
    for rid, version, text in session.execute(select(AssessmentVersionRow.id, AssessmentVersionRow.version_id,
                                                     AssessmentVersionRow.resource)).yield_per(BATCH):
        ref = f"RiskAssessment/{rid}/_history/{version}"
        _compare(ref, text, recorded, report)
        seen.add(ref)
        latest[rid] = max(latest.get(rid, 0), version)
        report.versions += 1
    for rid, text in session.execute(select(ProvenanceRow.id, ProvenanceRow.resource)).yield_per(BATCH):
        ref = f"Provenance/{rid}/_history/1"
        _compare(ref, text, recorded, report)
        seen.add(ref)
        report.provenance += 1
    for ref in sorted(set(recorded) - seen):
        report.problem(f"{ref}: recorded in the audit trail but no longer stored (removed)")
    for rid, version, text in session.execute(select(AssessmentRow.id, AssessmentRow.version_id,
                                                     AssessmentRow.resource)).yield_per(BATCH):
        ref = f"RiskAssessment/{rid}/_history/{version}"
        if latest.get(rid) != version:
            report.problem(f"RiskAssessment/{rid}: current version {version} is not its latest stored version")
        elif recorded.get(ref) and _hash(text) != recorded[ref]:
            report.problem(f"RiskAssessment/{rid}: the current resource differs from {ref} (altered)")


def _hash(text: str) -> str | None:
    try:
        return sha256_of(orjson.loads(text))
    except orjson.JSONDecodeError:
        return None


def _compare(ref: str, text: str, recorded: dict[str, str], report: Report) -> None:
    if ref not in recorded:
        report.problem(f"{ref}: stored without an audit event (added behind the trail's back)")
    elif _hash(text) != recorded[ref]:
        report.problem(f"{ref}: content differs from what the audit trail recorded (altered)")
