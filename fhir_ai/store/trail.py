"""Assessments with versions, their Provenance and AuditEvents: each write is one transaction."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import orjson
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..errors import FhirAiError, NotFound, Unprocessable
from ..fhir import times
from ..search.params import SearchQuery
from ..search.values import date_range
from . import actors, indexing, provenance, searching
from .actors import Actor
from .audit import Access, Chain, Entity, add_index, sha256_of
from .tables import AssessmentRow, OutboxRow
from .trail_tables import AssessmentVersionRow, AuditEventRow, ProvenanceRow

log = logging.getLogger(__name__)


class VersionConflict(FhirAiError):
    """If-Match named a version that is no longer the current one."""
    status = 412
    code = "conflict"


@dataclass
class Saved:
    resource: dict[str, Any]
    created: bool            # False: the same assessment was already stored (idempotent repeat)


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


def _next_seq(session: Session, column: Any) -> int:
    # Safe without a sequence: every writer holds the audit chain lock (see audit.Chain).
    return (session.scalar(select(func.max(column))) or 0) + 1


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


class TrailMixin:
    """The parts of ``Store`` that keep history, Provenance and the audit trail."""

    def session(self) -> Session:  # provided by Store
        raise NotImplementedError

    def _now(self) -> datetime:     # provided by Store (one clock for the outbox and the trail)
        return _utcnow()

    # -- writes ----------------------------------------------------------------------------------
    def save_assessment(self, resource: dict[str, Any], *, model_id: str, model_version: str,
                        write_back_target: str | None = None, actor: Actor | None = None) -> Saved:
        """Store version 1 with its Provenance, AuditEvent and write-back outbox row, in one
        transaction; an assessment with the same identifier is returned instead (and the repeat audited)."""
        actor = actor or actors.current()
        identifier = resource["identifier"][0]["value"]
        now = self._now()
        stored = dict(resource)
        stored["meta"] = {**resource.get("meta", {}), "versionId": "1", "lastUpdated": times.format_datetime(now)}
        patient = patient_of(resource)
        with self.session() as session, session.begin():
            chain = Chain(session)
            existing = session.scalar(select(AssessmentRow).where(AssessmentRow.identifier == identifier))
            if existing is not None:
                current = orjson.loads(existing.resource)
                chain.append(Access("R", "read", operation="assess",
                                    description="repeated request: the stored assessment was returned",
                                    entities=_entities(current, patient=patient)), actor, now)
                chain.close()
                return Saved(current, False)
            if session.get(AssessmentRow, resource["id"]) is not None:
                raise Unprocessable(f"RiskAssessment/{resource['id']} is stored with another identifier")
            prov = provenance.for_assessment(stored, model_id=model_id, model_version=model_version,
                                             actor=actor, recorded=now)
            prov["meta"] = {"versionId": "1", "lastUpdated": times.format_datetime(now)}
            start, end = _occurrence(resource)
            prediction = (resource.get("prediction") or [{}])[0]
            risk_codes = (prediction.get("qualitativeRisk") or {}).get("coding") or [{}]
            encounter = indexing.split_reference((resource.get("encounter") or {}).get("reference") or "")
            text = orjson.dumps(stored).decode()
            session.add(AssessmentRow(
                id=resource["id"], identifier=identifier, version_id=1, seq=_next_seq(session, AssessmentRow.seq),
                patient_id=patient or "", encounter_id=encounter[1] if encounter else None,
                model_id=model_id, model_version=model_version, status=resource["status"],
                risk=risk_codes[0].get("code"), probability=prediction.get("probabilityDecimal"),
                occurrence=start, occurrence_end=end, sort_date=start or now, created_at=now, last_updated=now,
                resource=text))
            session.add(AssessmentVersionRow(id=resource["id"], version_id=1, last_updated=now, resource=text))
            add_index(session, "RiskAssessment", resource["id"], indexing.risk_assessment(stored))
            self._add_provenance(session, prov, resource["id"], 1, patient, now)
            if write_back_target:
                session.add(OutboxRow(resource_type="RiskAssessment", resource_id=resource["id"],
                                      target=write_back_target, status="pending", attempts=0,
                                      created_at=now, updated_at=now))
            chain.append(Access("C", "create", operation="assess",
                                entities=_entities(stored, prov, patient=patient)), actor, now)
            chain.close()
        return Saved(stored, True)

    def _add_provenance(self, session: Session, prov: dict[str, Any], target_id: str, version: int,
                        patient: str | None, now: datetime) -> None:
        session.add(ProvenanceRow(id=prov["id"], seq=_next_seq(session, ProvenanceRow.seq), target_id=target_id,
                                  target_version=version, recorded=now, last_updated=now,
                                  resource=orjson.dumps(prov).decode()))
        add_index(session, "Provenance", prov["id"], indexing.provenance(prov, patient))

    def withdraw_assessment(self, resource_id: str, *, reason: str, actor: Actor | None = None,
                            expected_version: int | None = None) -> Saved:
        """Mark an assessment entered-in-error as a new version (never in place); queue its write-back."""
        actor = actor or actors.current()
        now = self._now()
        with self.session() as session, session.begin():
            chain = Chain(session)
            row = session.get(AssessmentRow, resource_id)
            if row is None:
                raise NotFound(f"RiskAssessment/{resource_id} is not known here")
            if expected_version is not None and row.version_id != expected_version:
                raise VersionConflict(f"RiskAssessment/{resource_id} is at version {row.version_id}, "
                                      f"not {expected_version}", expression="If-Match")
            current = orjson.loads(row.resource)
            if row.status == "entered-in-error":
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
            self._add_provenance(session, prov, resource_id, version, patient, now)
            for outbox in session.scalars(select(OutboxRow).where(OutboxRow.resource_id == resource_id)):
                outbox.status, outbox.updated_at = "pending", now   # the hospital must learn of it too
            chain.append(Access("U", "update", operation="withdraw", description="entered in error",
                                entities=_entities(new, prov, patient=patient)), actor, now)
            chain.close()
        log.info("assessment %s withdrawn (version %s)", resource_id, version)
        return Saved(new, True)

    def record_access(self, access: Access) -> dict[str, Any]:
        """Append one AuditEvent (reads, searches, denials) to the chain."""
        with self.session() as session, session.begin():
            chain = Chain(session)
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

