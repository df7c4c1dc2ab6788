"""index layout: no ix_risk_assessment_patient_id (a prefix of ix_risk_assessment_patient_created);
on SQLite one search index ix_search_index_lookup (resource_type, resource_id, param, code) instead of
ix_search_index_value and ix_search_index_resource (PostgreSQL keeps those two: trail_tables.py)

Revision ID: 0004_search_index_layout
Revises: 0003_mapping_reload
Create Date: 2026-11-26
"""
from __future__ import annotations

from alembic import op

revision = '0004_search_index_layout'
down_revision = '0003_mapping_reload'
branch_labels = None
depends_on = None


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def upgrade() -> None:
    op.drop_index('ix_risk_assessment_patient_id', table_name='risk_assessment')
    if _sqlite():
        op.create_index('ix_search_index_lookup', 'search_index', ['resource_type', 'resource_id', 'param', 'code'],
                        unique=False)
        op.drop_index('ix_search_index_value', table_name='search_index')
        op.drop_index('ix_search_index_resource', table_name='search_index')


def downgrade() -> None:
    if _sqlite():
        op.create_index('ix_search_index_resource', 'search_index', ['resource_type', 'resource_id'], unique=False)
        op.create_index('ix_search_index_value', 'search_index', ['resource_type', 'param', 'code'], unique=False)
        op.drop_index('ix_search_index_lookup', table_name='search_index')
    op.create_index('ix_risk_assessment_patient_id', 'risk_assessment', ['patient_id'], unique=False)
