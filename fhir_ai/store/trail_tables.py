"""Append-only tables: assessment versions, Provenance, AuditEvent with its hash chain, the search index."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .tables import Base


def only_on_sqlite(index: Index, sqlite: bool) -> Index:
    """``index`` created on SQLite only (``sqlite``) or everywhere but SQLite (see ``created_on``)."""
    index.info["sqlite"] = sqlite
    return index.ddl_if(callable_=lambda *_, dialect, **__: (dialect.name == "sqlite") == sqlite)


def created_on(item: Any, dialect: str) -> bool:
    """False for an index of the tables that the database of ``dialect`` does not have (``only_on_sqlite``);
    Alembic's comparison of the tables with a database leaves those out (it does not read ``ddl_if``)."""
    sqlite = getattr(item, "info", {}).get("sqlite") if isinstance(item, Index) else None
    return sqlite is None or sqlite == (dialect == "sqlite")


class AssessmentVersionRow(Base):
    """Every version of every RiskAssessment, never changed: history and vread read from here."""
    __tablename__ = "risk_assessment_version"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resource: Mapped[str] = mapped_column(Text)

    # Type-level history and the export's _since: newest first, keyset pages (store.searching.history).
    __table_args__ = (Index("ix_risk_assessment_version_history", "last_updated", "id", "version_id"),)


class ProvenanceRow(Base):
    """The Provenance of one assessment version: model (Device), inputs and model card, who asked."""
    __tablename__ = "provenance"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    target_id: Mapped[str] = mapped_column(String(64), index=True)
    target_version: Mapped[int] = mapped_column(Integer)
    recorded: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    resource: Mapped[str] = mapped_column(Text)


class AuditEventRow(Base):
    """One AuditEvent; ``hash`` = sha256(seq, prev_hash, resource), so any change breaks the chain."""
    __tablename__ = "audit_event"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    recorded: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    action: Mapped[str] = mapped_column(String(1))
    outcome: Mapped[str] = mapped_column(String(2))
    agent: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(Text)

    @property
    def last_updated(self) -> datetime:
        return self.recorded


class ChainHeadRow(Base):
    """The last link of the audit chain (one row). Writers lock it first, which orders every write."""
    __tablename__ = "audit_chain"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class SearchIndexRow(Base):
    """Token, reference and number values of stored resources, one row per value (search only)."""
    __tablename__ = "search_index"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str] = mapped_column(String(64))
    # The resource's storage order (the ``seq`` of its row: risk_assessment, provenance, audit_event),
    # what SQLite's searches probe by (``probes_by_seq``). Null only in rows no resource stands for.
    resource_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    param: Mapped[str] = mapped_column(String(64))
    system: Mapped[str | None] = mapped_column(String(512), nullable=True)
    code: Mapped[str | None] = mapped_column(String(512), nullable=True)
    number: Mapped[float | None] = mapped_column(Float, nullable=True)

    # Searches are EXISTS subqueries correlated on the searched resource. PostgreSQL turns them into
    # semi-joins that start from the value index (resource_type, param, code → resource ids). SQLite runs
    # them as they are, one probe per row of the searched table, so there one index on (resource_type,
    # resource_seq, param, code) answers every probe with one seek, a resource's rows side by side. Keyed
    # on the storage order (ever growing), a transaction's new entries go to the right edge of each
    # type's part of the index: ~6 pages a $assess, where resource ids (random) took ~25 scattered ones
    # (measured); a value index would take ~50, one per Provenance entity (those are in provenance_entity).
    __table_args__ = (only_on_sqlite(Index("ix_search_index_lookup", "resource_type", "resource_seq", "param",
                                           "code"), True),
                      only_on_sqlite(Index("ix_search_index_value", "resource_type", "param", "code"), False),
                      only_on_sqlite(Index("ix_search_index_resource", "resource_type", "resource_id"), False))


class ProvenanceEntityRow(Base):
    """The resources each stored Provenance names as its entities (``Provenance?entity=``): one row per
    distinct (provenance, type, id). Every $assess stores two Provenance with ~50 inputs each, so these
    rows are most of a write: kept out of search_index, one narrow key and nothing else. On SQLite the
    table is its primary key (WITHOUT ROWID: each row stored once, a transaction's rows appended at the
    key's right edge); searches probe it by the Provenance's seq as they probe search_index. PostgreSQL
    adds the value index (id, type → seq) its semi-joins start from. ``reference_type`` is '' for a
    reference that names no type ('o5': found by ``entity=o5`` only). Longer ids and types are cut to the
    column widths (indexing.ID_WIDTH, TYPE_WIDTH)."""
    __tablename__ = "provenance_entity"

    provenance_seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    reference_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    reference_type: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (only_on_sqlite(Index("ix_provenance_entity_value", "reference_id", "reference_type"), False),
                      {"sqlite_with_rowid": False})


def probes_by_seq(dialect: str) -> bool:
    """True where searches (and verify) find a resource's index rows by ``resource_seq`` (SQLite's index),
    False where by ``resource_id`` (PostgreSQL's indexes)."""
    return dialect == "sqlite"
