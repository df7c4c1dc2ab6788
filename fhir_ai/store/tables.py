"""SQLAlchemy tables: stored assessments and the write-back outbox (the audit trail: trail_tables.py)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class AssessmentRow(Base):
    """One RiskAssessment as we answered it; the JSON is the resource, the columns are for search."""
    __tablename__ = "risk_assessment"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, default=1)
    identifier: Mapped[str] = mapped_column(String(128), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64))     # indexed by ix_risk_assessment_patient_created
    encounter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_id: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(32))
    risk: Mapped[str | None] = mapped_column(String(32), nullable=True)
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    occurrence: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resource: Mapped[str] = mapped_column(Text)
    # The current version's JSON is ``resource``; every version (this one too) is in
    # risk_assessment_version. ``seq`` is the storage order (keyset paging), ``occurrence`` ..
    # ``occurrence_end`` the range occurrence[x] stands for (date search), ``sort_date`` what
    # _sort=date orders by (occurrence, else storage time).
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    occurrence_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sort_date: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_risk_assessment_patient_created", "patient_id", "created_at"),)


class OutboxRow(Base):
    """A resource that must reach the hospital's server; kept until delivered (never lost)."""
    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(32), default="pending")   # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The write-back worker (fhir_ai.delivery): not before this time (backoff, Retry-After), and
    # which worker holds the row until when (a crashed worker's claim simply runs out).
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (UniqueConstraint("resource_type", "resource_id", "target", name="uq_outbox_target"),)


class CdsCardEventRow(Base):
    """CDS Hooks audit trail: each card returned ('issued') and each feedback on it (accepted/overridden)."""
    __tablename__ = "cds_card_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event: Mapped[str] = mapped_column(String(16))                  # issued | accepted | overridden
    service_id: Mapped[str] = mapped_column(String(64))
    card_uuid: Mapped[str] = mapped_column(String(64), index=True)
    hook_instance: Mapped[str | None] = mapped_column(String(128), nullable=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    assessment_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(128), nullable=True)
    indicator: Mapped[str | None] = mapped_column(String(16), nullable=True)
    override_system: Mapped[str | None] = mapped_column(String(512), nullable=True)
    override_code: Mapped[str | None] = mapped_column(String(128), nullable=True)
    override_display: Mapped[str | None] = mapped_column(String(512), nullable=True)
    user_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    accepted_suggestions: Mapped[str | None] = mapped_column(Text, nullable=True)   # JSON list of uuids
    # 'issued': JSON list of the uuids of the card's suggestions (migration 0009; NULL on cards issued before,
    # which recorded none, and on feedback). Added after card events were audited: a NULL is left out of the
    # row's sha256 (audit.row_digest), so rows stored before still verify and a list recorded later is covered.
    suggestions: Mapped[str | None] = mapped_column(Text, nullable=True, info={"digest_omits_null": True})
    outcome_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    client: Mapped[str | None] = mapped_column(String(512), nullable=True)          # the EHR's JWT iss
    tenant: Mapped[str | None] = mapped_column(String(256), nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class CdsJtiRow(Base):
    """JWT ids already accepted from each EHR, kept until the token expires (replay refused in every worker)."""
    __tablename__ = "cds_jti"

    issuer: Mapped[str] = mapped_column(String(512), primary_key=True)
    jti: Mapped[str] = mapped_column(String(256), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
