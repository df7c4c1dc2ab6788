"""The store: assessments (with history, Provenance and audit: trail.py), the write-back outbox."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any, ContextManager

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..fhir import times
from .tables import OutboxRow
from .tables import CdsCardEventRow, CdsJtiRow
from .engine import make_engine, migrate as run_migrations
from . import actors
from .audit import CARD_EVENT_SYSTEM, Access, Chain, Entity, row_digest
from .searching import utc
from .trail import Saved, TrailMixin  # noqa: F401  (Saved is part of the store's API)

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Store(TrailMixin):
    """All database access goes through here (one transaction per call).

    Assessments, their versions, Provenance and the audit trail: ``TrailMixin`` (trail.py).
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.engine = make_engine(url)
        if migrate:
            run_migrations(self.engine)
            # Leave no pooled connection behind: servers fork workers after start-up, and a
            # connection shared by two processes garbles both.
            self.engine.dispose()
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._session()

    def transaction(self) -> ContextManager[Connection]:
        """A Core connection in a transaction (committed at the end of the ``with``, rolled back on error)."""
        return self.engine.begin()

    def close(self) -> None:
        self.engine.dispose()

    def _now(self) -> datetime:
        return _utcnow()

    # -- write-back outbox ---------------------------------------------------------------------
    def outbox(self, status: str | None = None, resource_id: str | None = None) -> list[OutboxRow]:
        query = select(OutboxRow).order_by(OutboxRow.id)
        if status:
            query = query.where(OutboxRow.status == status)
        if resource_id:
            query = query.where(OutboxRow.resource_id == resource_id)
        with self.session() as session:
            return list(session.scalars(query))

    def record_write_backs(self, resource_ids: list[str], target: str, *, error: str | None = None) -> int:
        """The outcome of RiskAssessments sent to ``target`` outside the worker (a Bulk Data run's
        transaction Bundles): delivered (``error`` None), or refused/unanswered, then pending for the
        write-back worker. Each gets its outbox row (made or updated), so a later withdrawal is written
        back there too and auditors see the delivery. Returns how many rows were recorded."""
        now = _utcnow()
        values: dict[str, Any] = (
            {"status": "delivered", "delivered_at": now, "last_error": None, "next_attempt_at": None}
            if error is None else {"status": "pending", "last_error": error[:2000], "next_attempt_at": None})
        values.update(claimed_by=None, claimed_until=None)   # a worker still holding a row no longer owns it
        unique = list(dict.fromkeys(resource_ids))
        with self.session() as session, session.begin():
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                mine = and_(OutboxRow.resource_type == "RiskAssessment", OutboxRow.target == target,
                            OutboxRow.resource_id.in_(chunk))
                known = set(session.scalars(select(OutboxRow.resource_id).where(mine)))
                session.execute(update(OutboxRow).where(mine).values(
                    attempts=OutboxRow.attempts + 1, updated_at=now, **values))
                session.add_all(OutboxRow(resource_type="RiskAssessment", resource_id=rid, target=target,
                                          attempts=1, created_at=now, updated_at=now, **values)
                                for rid in chunk if rid not in known)
        return len(unique)

    def renew_claim(self, outbox_id: int, worker: str, *, lease: float, now: datetime | None = None) -> bool:
        """Extend ``worker``'s claim on a pending row to ``lease`` seconds from now, just before it sends
        the row; False if the claim is no longer its own (it ran out and another worker took the row,
        or the row was settled meanwhile): then it must not send."""
        now = now or _utcnow()
        with self.session() as session, session.begin():
            result = session.execute(update(OutboxRow).where(
                OutboxRow.id == outbox_id, OutboxRow.claimed_by == worker, OutboxRow.status == "pending")
                .values(claimed_until=now + timedelta(seconds=lease)))
            return result.rowcount == 1

    def record_delivery(self, outbox_id: int, *, ok: bool, error: str | None = None,
                        permanent: bool = False, retry_at: datetime | None = None,
                        worker: str | None = None) -> None:
        """One delivery attempt's result; releases the worker's claim. ``retry_at``: not before.
        With ``worker``, only while that worker holds the claim: a late result from a worker whose
        claim ran out (the row went to another) changes nothing, so it cannot undo a delivery."""
        now = _utcnow()
        with self.session() as session, session.begin():
            row = session.get(OutboxRow, outbox_id)
            if row is None:
                return
            if worker is not None and row.claimed_by != worker:
                log.warning("write-back row %s: result of %s dropped, its claim had passed to %s",
                            outbox_id, worker, row.claimed_by or "nobody")
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

    def defer_write_back(self, outbox_id: int, until: datetime, *, worker: str | None = None) -> None:
        """Release a claim without an attempt (e.g. the server's circuit is open); with ``worker``, only
        while that worker holds it (a claim that ran out and went to another worker is left alone)."""
        mine = [OutboxRow.id == outbox_id]
        if worker is not None:
            mine.append(OutboxRow.claimed_by == worker)
        with self.session() as session, session.begin():
            session.execute(update(OutboxRow).where(*mine)
                            .values(claimed_by=None, claimed_until=None, next_attempt_at=until))

    def write_back_state(self, resource_id: str) -> dict[str, Any] | None:
        rows = self.outbox(resource_id=resource_id)
        if not rows:
            return None
        row = rows[-1]
        return {"status": row.status, "attempts": row.attempts, "lastError": row.last_error,
                "deliveredAt": times.format_datetime(utc(row.delivered_at)) if row.delivered_at else None}


    # -- CDS Hooks: card audit trail and JWT replay protection ---------------------------------
    def add_card_events(self, events: list[dict[str, Any]], *, description: str) -> None:
        """Append card events (issued cards, feedback) with the AuditEvent that records them, in one
        transaction: each row is an entity of it (by identifier, with the sha256 of its columns), so
        ``audit verify`` finds a row altered, removed or added behind the trail's back, as for assessments."""
        if not events:
            return
        with self.session() as session, session.begin():
            chain = Chain(session.connection())
            now = self._now()
            rows = [CdsCardEventRow(received_at=now, **{k: utc(v) if isinstance(v, datetime) else v
                                                        for k, v in event.items()}) for event in events]
            session.add_all(rows)
            session.flush()                                  # their ids
            patients = sorted({row.patient_id for row in rows if row.patient_id})
            chain.append(Access("C", "create", operation="cds-hooks", description=description, entities=[
                *(Entity(str(row.id), row_digest(row), CARD_EVENT_SYSTEM) for row in rows),
                *(Entity(f"Patient/{p}") for p in patients)]), actors.current(), now)
            chain.close()

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

    def issued_cards(self, card_uuids: list[str]) -> dict[str, CdsCardEventRow]:
        """The 'issued' event of each of these cards that was issued (by card uuid; the first if repeated)."""
        wanted = list(dict.fromkeys(card_uuids))
        out: dict[str, CdsCardEventRow] = {}
        with self.session() as session:
            for start in range(0, len(wanted), 500):       # within every database's limit on bound parameters
                for row in session.scalars(select(CdsCardEventRow).where(
                        CdsCardEventRow.event == "issued", CdsCardEventRow.card_uuid.in_(wanted[start:start + 500]))
                        .order_by(CdsCardEventRow.id)):
                    out.setdefault(row.card_uuid, row)
        return out

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
