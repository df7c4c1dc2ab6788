"""Job state tables: one row per batch job, one per patient in it (progress, results, restarts)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from ..store.tables import Base


class JobRow(Base):
    """A batch job (FHIR asynchronous request pattern): who asked for what, its state and outcome."""
    __tablename__ = "job"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))               # group | all | ward | bulk-export
    scope: Mapped[str] = mapped_column(String(512))             # Group id, "all", or the export's URL
    status: Mapped[str] = mapped_column(String(16))             # queued | running | completed | failed | cancelled
    request: Mapped[str] = mapped_column(Text)                  # JSON: models, writeBack, the request line
    as_of: Mapped[datetime] = mapped_column(DateTime(timezone=True))   # fixed at creation: repeats are no-ops
    total: Mapped[int | None] = mapped_column(Integer, nullable=True)  # patients, once the members are known
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)    # JSON (bulk export: transactionTime ...)
    requested_by: Mapped[str] = mapped_column(String(256))
    requested_role: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_job_kind_scope_status", "kind", "scope", "status"),)


class JobItemRow(Base):
    """One patient of a job; ``pending`` until a worker has stored its assessments."""
    __tablename__ = "job_item"

    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # pending | assessed | insufficient | not-applicable | failed (no CHECK constraint: a new value
    # needs no migration, it must only fit the 16 characters)
    status: Mapped[str] = mapped_column(String(16))
    assessments: Mapped[str | None] = mapped_column(Text, nullable=True)   # JSON list of RiskAssessment ids
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # One execution of a chunk task (claimed_by) holds the patient until claimed_until, nobody else meanwhile;
    # attempts counts the claims that ran out without an outcome (a patient whose assessment kills its worker
    # process is given up after MAX_ATTEMPTS of them).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)    # task id:execution token

    __table_args__ = (Index("ix_job_item_job_status", "job_id", "status"),)
