"""provenance_entity: the entity references of each Provenance (Provenance?entity=) move out of search_index
into a table of their own, one narrow key per (provenance seq, id, type): on SQLite a WITHOUT ROWID table
(each row stored once, no separate index to keep), on PostgreSQL with a value index for its semi-joins.
Most of an $assess's index rows were these (two Provenance with ~50 inputs each); searches answer the same.

Revision ID: 0007_provenance_entity
Revises: 0006_version_history_index
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007_provenance_entity'
down_revision = '0006_version_history_index'
branch_labels = None
depends_on = None


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    op.create_table(
        'provenance_entity',
        sa.Column('provenance_seq', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('reference_id', sa.String(length=512), nullable=False),
        sa.Column('reference_type', sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint('provenance_seq', 'reference_id', 'reference_type'),
        sqlite_with_rowid=False)
    if not _sqlite():
        op.create_index('ix_provenance_entity_value', 'provenance_entity', ['reference_id', 'reference_type'],
                        unique=False)
    op.execute("INSERT INTO provenance_entity (provenance_seq, reference_id, reference_type) "
               "SELECT DISTINCT resource_seq, substr(code, 1, 512), substr(COALESCE(system, ''), 1, 64) FROM search_index "
               "WHERE resource_type = 'Provenance' AND param = 'entity' AND code IS NOT NULL "
               "AND resource_seq IS NOT NULL")
    op.execute("DELETE FROM search_index WHERE resource_type = 'Provenance' AND param = 'entity'")


def downgrade() -> None:
    op.execute("INSERT INTO search_index (resource_type, resource_id, resource_seq, param, system, code, number) "
               "SELECT 'Provenance', p.id, e.provenance_seq, 'entity', NULLIF(e.reference_type, ''), e.reference_id, "
               "NULL FROM provenance_entity e JOIN provenance p ON p.seq = e.provenance_seq "
               "ORDER BY e.provenance_seq")
    if not _sqlite():
        op.drop_index('ix_provenance_entity_value', table_name='provenance_entity')
    op.drop_table('provenance_entity')
