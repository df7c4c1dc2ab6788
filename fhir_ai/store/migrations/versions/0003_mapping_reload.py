"""mapping reloads every worker follows: mapping_reload (fhir_ai/reloads.py)

Revision ID: 0003_mapping_reload
Revises: 0002_jobs
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_mapping_reload'
down_revision = '0002_jobs'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('mapping_reload',
    sa.Column('seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('loaded', sa.Text(), nullable=False),
    sa.Column('requested_by', sa.String(length=256), nullable=False),
    sa.Column('recorded', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )


def downgrade() -> None:
    op.drop_table('mapping_reload')
