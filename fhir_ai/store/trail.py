"""Assessments with versions, their Provenance and AuditEvents: each write is one transaction."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ContextManager, Iterator

import orjson
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..errors import FhirAiError, NotFound, Unprocessable
from ..fhir import times
from ..search.params import HistoryQuery, SearchQuery
from ..search.values import date_range
from . import actors, indexing, provenance, rawsql, searching
from .actors import Actor
from .audit import Access, Chain, Entity, sha256_of
from .tables import AssessmentRow, OutboxRow
from .trail_tables import AssessmentVersionRow, AuditEventRow, ProvenanceRow

log = logging.getLogger(__name__)


class VersionConflict(FhirAiError):
    """If-Match named a version that is no longer the current one."""
    status = 412
    code = "conflict"


@dataclass
class NewAssessment:
    """One assessment to store with ``save_assessments``: the resource, the model that made it and the
    mapping its inputs went through (both named in its Provenance)."""
    resource: dict[str, Any]
    model_id: str
    model_version: str
    write_back_target: str | None = None
    mapping: provenance.MappingUsed | None = None


@dataclass
class Saved:
    resource: dict[str, Any]
    created: bool            # False: the same assessment was already stored (idempotent repeat)
    # ``resource`` as stored: orjson's JSON of it, byte for byte (an answer embeds it instead of
    # serialising the resource again); None when not at hand (a repeat answers from the parsed row).
    text: str | None = None


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _occurrence(resource: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    """The [start, end) range occurrence[x] stands for (a dateTime by its precision, or a Period)."""
    try:
        if resource.get("occurrenceDateTime"):
            return date_range(resource["occurrenceDateTime"])
        period = resource.get("occurrencePeriod") or {}
        start = date_range(period["start"])[0] if period.get("start") else None
        end = date_range(period["end"])[1] if period.get("end") else None
        return start, end
    except ValueError:
        return None, None


_ASSESSMENT_INSERT = rawsql.Insert(AssessmentRow.__table__, (
    "id", "identifier", "version_id", "seq", "patient_id", "encounter_id", "model_id", "model_version", "status",
    "risk", "probability", "occurrence", "occurrence_end", "sort_date", "created_at", "last_updated", "resource"))
_VERSION_INSERT = rawsql.Insert(AssessmentVersionRow.__table__, ("id", "version_id", "last_updated", "resource"))
_PROVENANCE_INSERT = rawsql.Insert(ProvenanceRow.__table__, (
    "id", "seq", "target_id", "target_version", "recorded", "last_updated", "resource"))
_OUTBOX_INSERT = rawsql.Insert(OutboxRow.__table__, (
    "resource_type", "resource_id", "target", "status", "attempts", "created_at", "updated_at"))
# One round trip for a batch: whatever already holds one of the identifiers or ids being saved, and a
# row without id holding the last storage positions (storage order without a sequence: safe because
# every writer holds the audit chain lock, audit.Chain).
_LOOKUP = (f"SELECT NULL, NULL, NULL, (SELECT max(seq) FROM {AssessmentRow.__tablename__}), "
           f"(SELECT max(seq) FROM {ProvenanceRow.__tablename__}) "
           f"UNION ALL SELECT id, identifier, resource, NULL, NULL FROM {AssessmentRow.__tablename__} "
           "WHERE identifier IN ({}) OR id IN ({})")


def _versioned(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{resource['id']}/_history/{resource['meta']['versionId']}"


def _entities(*resources: dict[str, Any], patient: str | None = None) -> list[Entity]:
    out = [Entity(_versioned(r), sha256_of(r)) for r in resources]
    if patient:
        out.append(Entity(f"Patient/{patient}"))
    return out


def patient_of(resource: dict[str, Any]) -> str | None:
    parsed = indexing.split_reference((resource.get("subject") or {}).get("reference") or "")
    return parsed[1] if parsed and parsed[0] == "Patient" else None


def _provenance_row(chain: Chain, prov: dict[str, Any], target_id: str, version: int, patient: str | None,
                    seq: int, now: datetime) -> tuple[Any, ...]:
    """The provenance row (``_PROVENANCE_INSERT``); its search index and entity keys go into the chain's buffers."""
    entries, entities = indexing.provenance(prov, patient)
    chain.index("Provenance", prov["id"], seq, entries)
    chain.entities(seq, entities)
    return prov["id"], seq, target_id, version, now, now, orjson.dumps(prov).decode()


class TrailMixin:
    """The parts of ``Store`` that keep history, Provenance and the audit trail."""

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def transaction(self) -> ContextManager[Connection]:  # provided by Store: a Core connection in a transaction
        raise NotImplementedError

    def _now(self) -> datetime:     # provided by Store (one clock for the outbox and the trail)
        return _utcnow()

    # -- writes ----------------------------------------------------------------------------------
    def save_assessment(self, resource: dict[str, Any], *, model_id: str, model_version: str,
                        write_back_target: str | None = None, actor: Actor | None = None) -> Saved:
        """Store version 1 with its Provenance, AuditEvent and write-back outbox row, in one
        transaction; an assessment with the same identifier is returned instead (and the repeat audited)."""
        return self.save_assessments([NewAssessment(resource, model_id, model_version, write_back_target)],
                                     actor=actor)[0]

    def save_assessments(self, items: list[NewAssessment], *, actor: Actor | None = None) -> list[Saved]:
        """``save_assessment`` for several assessments (e.g. a model's and its NEWS2 companion) in ONE
        transaction: all are stored, or none. Each gets the rows and the AuditEvent it would get alone,
        in the given order; an item repeating an earlier item's identifier is a repeat of it."""
        if not items:
            return []
        actor = actor or actors.current()
        identifiers = [item.resource["identifier"][0]["value"] for item in items]
        out: list[Saved] = []
        with self.transaction() as connection:
            chain = Chain(connection)
            # Stamped once the chain's lock is held, so lastUpdated follows commit order: a history or
            # _since reader never finds a version with an older lastUpdated appear after a newer one.
            now = self._now()
            stamp = times.format_datetime(now)
            by_identifier: dict[str, str] = {}      # identifier -> stored JSON text
            taken: set[str] = set()                 # ids stored (or being stored)
            seqs = [0, 0]
            for rid, identifier, text, last_assessment, last_provenance in rawsql.run(
                    connection, rawsql.statement(connection, _LOOKUP, len(items), len(items)),
                    (*identifiers, *(item.resource["id"] for item in items))):
                if rid is None:
                    seqs = [last_assessment or 0, last_provenance or 0]
                    continue
                by_identifier[identifier] = text
                taken.add(rid)
            rows: dict[rawsql.Insert, list[tuple[Any, ...]]] = {
                _ASSESSMENT_INSERT: [], _VERSION_INSERT: [], _PROVENANCE_INSERT: [], _OUTBOX_INSERT: []}
            for item, identifier in zip(items, identifiers):
                resource = item.resource
                patient = patient_of(resource)
                if identifier in by_identifier:
                    current = orjson.loads(by_identifier[identifier])
                    chain.append(Access("R", "read", operation="assess",
                                        description="repeated request: the stored assessment was returned",
                                        entities=_entities(current, patient=patient)), actor, now)
                    out.append(Saved(current, False))
                    continue
                if resource["id"] in taken:
                    raise Unprocessable(f"RiskAssessment/{resource['id']} is stored with another identifier")
                seqs = [seqs[0] + 1, seqs[1] + 1]
                stored, text = self._stage_new(chain, rows, item, identifier, patient, seqs, actor, now, stamp)
                by_identifier[identifier] = text
                taken.add(resource["id"])
                out.append(Saved(stored, True, text))
            chain.close(rows.items())
        return out

    def _stage_new(self, chain: Chain, rows: dict[rawsql.Insert, list[tuple[Any, ...]]], item: NewAssessment,
                   identifier: str, patient: str | None, seqs: list[int], actor: Actor, now: datetime,
                   stamp: str) -> tuple[dict[str, Any], str]:
        """The rows of one new assessment (buffered in ``rows`` and ``chain``); (stored resource, its JSON)."""
        resource = item.resource
        rid = resource["id"]
        stored = dict(resource)
        stored["meta"] = {**resource.get("meta", {}), "versionId": "1", "lastUpdated": stamp}
        prov = provenance.for_assessment(stored, model_id=item.model_id, model_version=item.model_version,
                                         actor=actor, recorded=now, mapping=item.mapping)
        prov["meta"] = {"versionId": "1", "lastUpdated": stamp}
        start, end = _occurrence(resource)
        prediction = (resource.get("prediction") or [{}])[0]
        risk_codes = (prediction.get("qualitativeRisk") or {}).get("coding") or [{}]
        encounter = indexing.split_reference((resource.get("encounter") or {}).get("reference") or "")
        text = orjson.dumps(stored).decode()
        rows[_ASSESSMENT_INSERT].append((
            rid, identifier, 1, seqs[0], patient or "", encounter[1] if encounter else None, item.model_id,
            item.model_version, resource["status"], risk_codes[0].get("code"), prediction.get("probabilityDecimal"),
            start, end, start or now, now, now, text))
        rows[_VERSION_INSERT].append((rid, 1, now, text))
        chain.index("RiskAssessment", rid, seqs[0], indexing.risk_assessment(stored))
        rows[_PROVENANCE_INSERT].append(_provenance_row(chain, prov, rid, 1, patient, seqs[1], now))
        if item.write_back_target:
            rows[_OUTBOX_INSERT].append(("RiskAssessment", rid, item.write_back_target, "pending", 0, now, now))
        chain.append(Access("C", "create", operation="assess",
                            entities=_entities(stored, prov, patient=patient)), actor, now)
        return stored, text

    def withdraw_assessment(self, resource_id: str, *, reason: str, actor: Actor | None = None,
                            expected_version: int | None = None) -> Saved:
        """Mark an assessment entered-in-error as a new version (never in place); queue its write-back."""
        actor = actor or actors.current()
        with self.session() as session, session.begin():
            chain = Chain(session.connection())
            now = self._now()               # under the chain's lock, as in save_assessments
            row = session.get(AssessmentRow, resource_id)
            if row is None:
                raise NotFound(f"RiskAssessment/{resource_id} is not known here")
            if expected_version is not None and row.version_id != expected_version:
                raise VersionConflict(f"RiskAssessment/{resource_id} is at version {row.version_id}, "
                                      f"not {expected_version}", expression="If-Match")
            current = orjson.loads(row.resource)
            if row.status == "entered-in-error":
                # Withdrawn already: nothing changes, but the request is on record (as a repeated $assess is).
                chain.append(Access("R", "read", operation="withdraw",
                                    description="repeated withdrawal: the assessment was already entered in error",
                                    entities=_entities(current, patient=patient_of(current))), actor, now)
                chain.close()
                return Saved(current, False)
            version = row.version_id + 1
            new = dict(current)
            new["status"] = "entered-in-error"
            new["meta"] = {**current.get("meta", {}), "versionId": str(version),
                           "lastUpdated": times.format_datetime(now)}
            new["note"] = [*current.get("note", []), {"time": times.format_datetime(now),
                                                       "text": f"Entered in error: {reason}"}]
            text = orjson.dumps(new).decode()
            row.version_id, row.status, row.last_updated, row.resource = version, new["status"], now, text
            session.add(AssessmentVersionRow(id=resource_id, version_id=version, last_updated=now, resource=text))
            prov = provenance.for_withdrawal(new, reason=reason, actor=actor, recorded=now)
            prov["meta"] = {"versionId": "1", "lastUpdated": times.format_datetime(now)}
            patient = patient_of(new)
            seq = (session.scalar(select(func.max(ProvenanceRow.seq))) or 0) + 1
            provenance_row = _provenance_row(chain, prov, resource_id, version, patient, seq, now)
            for outbox in session.scalars(select(OutboxRow).where(OutboxRow.resource_id == resource_id)):
                outbox.status, outbox.updated_at = "pending", now   # the hospital must learn of it too
            chain.append(Access("U", "update", operation="withdraw", description="entered in error",
                                entities=_entities(new, prov, patient=patient)), actor, now)
            chain.close([(_PROVENANCE_INSERT, [provenance_row])])
        log.info("assessment %s withdrawn (version %s)", resource_id, version)
        return Saved(new, True)

    def record_access(self, access: Access) -> dict[str, Any]:
        """Append one AuditEvent (reads, searches, denials) to the chain."""
        with self.session() as session, session.begin():
            chain = Chain(session.connection())
            event = chain.append(access, access.actor or actors.current(), self._now())
            chain.close()
        return event

    # -- reads -----------------------------------------------------------------------------------
    def get_assessment(self, resource_id: str) -> dict[str, Any] | None:
        with self.session() as session:
            text = session.scalar(select(AssessmentRow.resource).where(AssessmentRow.id == resource_id))
            return orjson.loads(text) if text else None

    def get_assessment_by_identifier(self, identifier: str) -> dict[str, Any] | None:
        with self.session() as session:
            text = session.scalar(select(AssessmentRow.resource).where(AssessmentRow.identifier == identifier))
            return orjson.loads(text) if text else None

    def get_assessment_version(self, resource_id: str, version: int) -> dict[str, Any] | None:
        with self.session() as session:
            row = session.get(AssessmentVersionRow, (resource_id, version))
            return orjson.loads(row.resource) if row else None

    def assessment_history(self, resource_id: str) -> list[dict[str, Any]]:
        """Every version, newest first (empty: unknown id)."""
        with self.session() as session:
            rows = session.scalars(select(AssessmentVersionRow.resource).where(AssessmentVersionRow.id == resource_id)
                                   .order_by(AssessmentVersionRow.version_id.desc()))
            return [orjson.loads(text) for text in rows]

    def history(self, query: HistoryQuery) -> searching.Page:
        """A page of every assessment's versions (type-level history), newest first."""
        with self.session() as session:
            return searching.history(session, query)

    def provenance_patients(self, provenance_ids: list[str]) -> list[str]:
        """The patients the assessments these Provenance are about belong to (R4 Provenance names none),
        distinct, for the audit trail of who read what."""
        if not provenance_ids:
            return []
        with self.session() as session:
            rows = session.scalars(select(AssessmentRow.patient_id).distinct()
                                   .join(ProvenanceRow, ProvenanceRow.target_id == AssessmentRow.id)
                                   .where(ProvenanceRow.id.in_(set(provenance_ids))))
            return sorted(p for p in rows if p)

    def get_provenance(self, resource_id: str) -> dict[str, Any] | None:
        with self.session() as session:
            text = session.scalar(select(ProvenanceRow.resource).where(ProvenanceRow.id == resource_id))
            return orjson.loads(text) if text else None

    def get_audit_event(self, resource_id: str) -> dict[str, Any] | None:
        with self.session() as session:
            text = session.scalar(select(AuditEventRow.resource).where(AuditEventRow.id == resource_id))
            return orjson.loads(text) if text else None

    def search(self, query: SearchQuery) -> searching.Page:
        with self.session() as session:
            return searching.run(session, query)

    def iter_assessments(self) -> Iterator[dict[str, Any]]:
        """Current versions in storage order."""
        yield from self._stream(select(AssessmentRow.resource).order_by(AssessmentRow.seq))

    def export_rows(self, resource_type: str, since: datetime | None = None) -> tuple[int, Iterator[str]]:
        """(how many, stored JSON texts) of every RiskAssessment version, Provenance or AuditEvent
        stored at or after ``since``, oldest first, streamed."""
        table, column, order = {
            "RiskAssessment": (AssessmentVersionRow, AssessmentVersionRow.last_updated,
                               (AssessmentVersionRow.last_updated, AssessmentVersionRow.id,
                                AssessmentVersionRow.version_id)),
            "Provenance": (ProvenanceRow, ProvenanceRow.recorded, (ProvenanceRow.seq,)),
            "AuditEvent": (AuditEventRow, AuditEventRow.recorded, (AuditEventRow.seq,)),
        }[resource_type]
        where = [column >= since] if since is not None else []
        with self.session() as session:
            total = session.scalar(select(func.count()).select_from(table).where(*where)) or 0
        return total, self._stream(select(table.resource).where(*where).order_by(*order), decode=False)

    def _stream(self, statement: Any, decode: bool = True) -> Iterator[Any]:
        with self.session() as session:
            for text in session.execute(statement.execution_options(yield_per=500)).scalars():
                yield orjson.loads(text) if decode else text

