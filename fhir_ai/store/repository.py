"""The store: save assessments idempotently, read and search them, track write-back."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import orjson
from sqlalchemy import and_, create_engine, event, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..fhir import times
from .tables import AssessmentRow, Base, OutboxRow
from .tables import CdsCardEventRow, CdsJtiRow

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Saved:
    resource: dict[str, Any]
    created: bool            # False: the same assessment was already stored (idempotent repeat)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets readers and a writer work at once; busy_timeout waits instead of failing.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()
    return engine


class Store:
    """All database access goes through here (one transaction per call)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session()

    def close(self) -> None:
        self.engine.dispose()

    # -- assessments ---------------------------------------------------------------------------
    def save_assessment(self, resource: dict[str, Any], *, model_id: str, model_version: str,
                        write_back_target: str | None = None) -> Saved:
        """Insert unless an assessment with the same identifier exists; queue its write-back."""
        identifier = resource["identifier"][0]["value"]
        prediction = (resource.get("prediction") or [{}])[0]
        risk_codes = (prediction.get("qualitativeRisk") or {}).get("coding") or [{}]
        occurrence = resource.get("occurrenceDateTime")
        now = _utcnow()
        row = AssessmentRow(
            id=resource["id"], identifier=identifier, version_id=1,
            patient_id=resource["subject"]["reference"].split("/", 1)[1],
            encounter_id=(resource.get("encounter") or {}).get("reference", "/").split("/", 1)[1] or None,
            model_id=model_id, model_version=model_version, status=resource["status"],
            risk=risk_codes[0].get("code"), probability=prediction.get("probabilityDecimal"),
            occurrence=times.parse_datetime(occurrence) if occurrence else None, created_at=now,
            resource=b"")
        stored = dict(resource)
        stored["meta"] = {**resource.get("meta", {}), "versionId": "1", "lastUpdated": times.format_datetime(now)}
        row.resource = orjson.dumps(stored).decode()
        with self.session() as session:
            try:
                with session.begin():
                    session.add(row)
                    if write_back_target:
                        session.add(OutboxRow(resource_type="RiskAssessment", resource_id=row.id,
                                              target=write_back_target, status="pending", attempts=0,
                                              created_at=now, updated_at=now))
                return Saved(stored, True)
            except IntegrityError:
                session.rollback()
        existing = self.get_assessment_by_identifier(identifier)
        if existing is None:   # a different row holds the id: never overwrite it
            raise
        return Saved(existing, False)

    def get_assessment(self, resource_id: str) -> dict[str, Any] | None:
        with self.session() as session:
            row = session.get(AssessmentRow, resource_id)
            return orjson.loads(row.resource) if row else None

    def get_assessment_by_identifier(self, identifier: str) -> dict[str, Any] | None:
        with self.session() as session:
            row = session.scalars(select(AssessmentRow).where(AssessmentRow.identifier == identifier)).first()
            return orjson.loads(row.resource) if row else None

    def search_assessments(self, *, patient: str | None = None, count: int = 50,
                           offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """(total, page) newest first."""
        query = select(AssessmentRow)
        total_query = select(func.count()).select_from(AssessmentRow)
        if patient is not None:
            query = query.where(AssessmentRow.patient_id == patient)
            total_query = total_query.where(AssessmentRow.patient_id == patient)
        query = query.order_by(AssessmentRow.created_at.desc(), AssessmentRow.id).offset(offset).limit(count)
        with self.session() as session:
            total = session.scalar(total_query) or 0
            return total, [orjson.loads(row.resource) for row in session.scalars(query)]

    # -- write-back outbox ---------------------------------------------------------------------
    def outbox(self, status: str | None = None, resource_id: str | None = None) -> list[OutboxRow]:
        query = select(OutboxRow).order_by(OutboxRow.id)
        if status:
            query = query.where(OutboxRow.status == status)
        if resource_id:
            query = query.where(OutboxRow.resource_id == resource_id)
        with self.session() as session:
            return list(session.scalars(query))

    def record_delivery(self, outbox_id: int, *, ok: bool, error: str | None = None,
                        permanent: bool = False, retry_at: datetime | None = None) -> None:
        """One delivery attempt's result; releases the worker's claim. ``retry_at``: not before."""
        now = _utcnow()
        with self.session() as session, session.begin():
            row = session.get(OutboxRow, outbox_id)
            if row is None:
                return
            row.attempts += 1
            row.updated_at = now
            row.claimed_by = row.claimed_until = None
            row.next_attempt_at = retry_at if not ok else None
            if ok:
                row.status, row.delivered_at, row.last_error = "delivered", now, None
            else:
                row.status = "failed" if permanent else "pending"
                row.last_error = (error or "")[:2000]

    def claim_write_backs(self, worker: str, *, lease: float, limit: int = 100, min_age: float = 0.0,
                          now: datetime | None = None) -> list[OutboxRow]:
        """Claim pending rows that are due (one atomic UPDATE each), so no other worker sends them.

        Rows never attempted and younger than ``min_age`` seconds are left alone: the request that
        stored them is delivering them right now.
        """
        now = now or _utcnow()
        until = now + timedelta(seconds=lease)
        free = or_(OutboxRow.claimed_until.is_(None), OutboxRow.claimed_until < now)
        due = or_(OutboxRow.next_attempt_at.is_(None), OutboxRow.next_attempt_at <= now)
        settled = or_(OutboxRow.attempts > 0, OutboxRow.created_at <= now - timedelta(seconds=min_age))
        claimable = and_(OutboxRow.status == "pending", free, due, settled)
        with self.session() as session:
            candidates = list(session.scalars(select(OutboxRow.id).where(claimable)
                                              .order_by(OutboxRow.id).limit(limit)))
        claimed = []
        for outbox_id in candidates:
            with self.session() as session, session.begin():
                # The WHERE repeats the test: of two workers racing for a row, one updates it.
                result = session.execute(update(OutboxRow).where(OutboxRow.id == outbox_id, claimable)
                                         .values(claimed_by=worker, claimed_until=until))
                if result.rowcount == 1:
                    claimed.append(session.get(OutboxRow, outbox_id))
        return claimed

    def defer_write_back(self, outbox_id: int, until: datetime) -> None:
        """Release a claim without an attempt (e.g. the server's circuit is open)."""
        with self.session() as session, session.begin():
            row = session.get(OutboxRow, outbox_id)
            if row is not None:
                row.claimed_by = row.claimed_until = None
                row.next_attempt_at = until

    def write_back_state(self, resource_id: str) -> dict[str, Any] | None:
        rows = self.outbox(resource_id=resource_id)
        if not rows:
            return None
        row = rows[-1]
        return {"status": row.status, "attempts": row.attempts, "lastError": row.last_error,
                "deliveredAt": times.format_datetime(row.delivered_at) if row.delivered_at else None}

    def iter_assessments(self) -> Iterator[dict[str, Any]]:
        with self.session() as session:
            for row in session.scalars(select(AssessmentRow).order_by(AssessmentRow.created_at)):
                yield orjson.loads(row.resource)

    # -- CDS Hooks: card audit trail and JWT replay protection ---------------------------------
    def add_card_events(self, events: list[dict[str, Any]]) -> None:
        """Append card events (issued cards, feedback); append-only, one transaction."""
        now = _utcnow()
        with self.session() as session, session.begin():
            session.add_all([CdsCardEventRow(received_at=now, **event) for event in events])

    def card_events(self, *, service_id: str | None = None, patient_id: str | None = None,
                    card_uuid: str | None = None, event: str | None = None, count: int = 100,
                    offset: int = 0) -> tuple[int, list[CdsCardEventRow]]:
        """(total, page) of card events, oldest first."""
        conditions = [column == value for column, value in (
            (CdsCardEventRow.service_id, service_id), (CdsCardEventRow.patient_id, patient_id),
            (CdsCardEventRow.card_uuid, card_uuid), (CdsCardEventRow.event, event)) if value is not None]
        with self.session() as session:
            total = session.scalar(select(func.count()).select_from(CdsCardEventRow).where(*conditions)) or 0
            rows = session.scalars(select(CdsCardEventRow).where(*conditions).order_by(CdsCardEventRow.id)
                                   .offset(offset).limit(count))
            return total, list(rows)

    def use_jti(self, issuer: str, jti: str, expires_at: datetime) -> bool:
        """Record a JWT id; False if this issuer already used it (a replay). Forgets expired ids."""
        now = _utcnow()
        with self.session() as session:
            try:
                with session.begin():
                    session.execute(CdsJtiRow.__table__.delete().where(CdsJtiRow.expires_at < now))
                    session.add(CdsJtiRow(issuer=issuer, jti=jti, expires_at=expires_at))
                return True
            except IntegrityError:
                session.rollback()
                return False
