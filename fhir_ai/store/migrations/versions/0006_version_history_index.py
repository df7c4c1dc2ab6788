"""ix_risk_assessment_version_history on risk_assessment_version (last_updated, id, version_id): type-level
history (GET /RiskAssessment/_history, newest first, _since/_at, keyset pages) and the export's _since read
an index range in their own order instead of scanning and sorting every version on every page

Revision ID: 0006_version_history_index
Revises: 0005_search_index_seq
Create Date: 2026-11-26
"""
from __future__ import annotations

from alembic import op

revision = '0006_version_history_index'
down_revision = '0005_search_index_seq'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_risk_assessment_version_history', 'risk_assessment_version',
                    ['last_updated', 'id', 'version_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_risk_assessment_version_history', table_name='risk_assessment_version')
