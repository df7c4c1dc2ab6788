"""job_item claims: a worker claims a patient (``claimed_until``) before assessing it and counts the attempts, so
two copies of a chunk never assess one patient at once, a patient whose assessment kills its worker is given
up after a few attempts, and a job whose tasks were lost is resumed (fhir_ai.jobs.tasks.resume_jobs).

Revision ID: 0008_job_item_claims
Revises: 0007_provenance_entity
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008_job_item_claims'
down_revision = '0007_provenance_entity'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job_item') as batch:
        batch.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('claimed_until', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('claimed_by', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_item') as batch:
        batch.drop_column('claimed_by')
        batch.drop_column('claimed_until')
        batch.drop_column('attempts')
