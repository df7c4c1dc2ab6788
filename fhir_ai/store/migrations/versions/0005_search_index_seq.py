"""search_index.resource_seq: each row's resource storage order (the seq of its risk_assessment,
provenance or audit_event row), filled for the rows stored before; on SQLite ix_search_index_lookup is
(resource_type, resource_seq, param, code) instead of (resource_type, resource_id, param, code), so a
transaction's new entries go to the index's right edge (PostgreSQL keeps its indexes: trail_tables.py)

Revision ID: 0005_search_index_seq
Revises: 0004_search_index_layout
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_search_index_seq'
down_revision = '0004_search_index_layout'
branch_labels = None
depends_on = None

_TABLES = {"RiskAssessment": "risk_assessment", "Provenance": "provenance", "AuditEvent": "audit_event"}


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    op.add_column('search_index', sa.Column('resource_seq', sa.Integer(), nullable=True))
    for resource_type, table in _TABLES.items():
        op.execute(sa.text(f"UPDATE search_index SET resource_seq = (SELECT r.seq FROM {table} r "
                           "WHERE r.id = search_index.resource_id) WHERE resource_type = :type")
                   .bindparams(type=resource_type))
    if _sqlite():
        op.drop_index('ix_search_index_lookup', table_name='search_index')
        op.create_index('ix_search_index_lookup', 'search_index', ['resource_type', 'resource_seq', 'param', 'code'],
                        unique=False)


def downgrade() -> None:
    if _sqlite():
        op.drop_index('ix_search_index_lookup', table_name='search_index')
        op.create_index('ix_search_index_lookup', 'search_index', ['resource_type', 'resource_id', 'param', 'code'],
                        unique=False)
    with op.batch_alter_table('search_index') as batch:
        batch.drop_column('resource_seq')
