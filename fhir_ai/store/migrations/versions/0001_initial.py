"""initial schema: assessments, versions, provenance, audit chain, search index, outbox, CDS Hooks

Revision ID: 0001
Revises: -
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_chain',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('audit_event',
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('recorded', sa.DateTime(timezone=True), nullable=False),
    sa.Column('action', sa.String(length=1), nullable=False),
    sa.Column('outcome', sa.String(length=2), nullable=False),
    sa.Column('agent', sa.String(length=256), nullable=False),
    sa.Column('role', sa.String(length=64), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('resource', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_event_recorded'), ['recorded'], unique=False)

    op.create_table('cds_card_event',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('event', sa.String(length=16), nullable=False),
    sa.Column('service_id', sa.String(length=64), nullable=False),
    sa.Column('card_uuid', sa.String(length=64), nullable=False),
    sa.Column('hook_instance', sa.String(length=128), nullable=True),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('assessment_id', sa.String(length=64), nullable=True),
    sa.Column('model_id', sa.String(length=64), nullable=True),
    sa.Column('model_version', sa.String(length=128), nullable=True),
    sa.Column('indicator', sa.String(length=16), nullable=True),
    sa.Column('override_system', sa.String(length=512), nullable=True),
    sa.Column('override_code', sa.String(length=128), nullable=True),
    sa.Column('override_display', sa.String(length=512), nullable=True),
    sa.Column('user_comment', sa.Text(), nullable=True),
    sa.Column('accepted_suggestions', sa.Text(), nullable=True),
    sa.Column('outcome_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('client', sa.String(length=512), nullable=True),
    sa.Column('tenant', sa.String(length=256), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('cds_card_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cds_card_event_card_uuid'), ['card_uuid'], unique=False)
        batch_op.create_index(batch_op.f('ix_cds_card_event_patient_id'), ['patient_id'], unique=False)

    op.create_table('cds_jti',
    sa.Column('issuer', sa.String(length=512), nullable=False),
    sa.Column('jti', sa.String(length=256), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('issuer', 'jti')
    )
    with op.batch_alter_table('cds_jti', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cds_jti_expires_at'), ['expires_at'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=512), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('claimed_by', sa.String(length=128), nullable=True),
    sa.Column('claimed_until', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('resource_type', 'resource_id', 'target', name='uq_outbox_target')
    )
    op.create_table('provenance',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('target_id', sa.String(length=64), nullable=False),
    sa.Column('target_version', sa.Integer(), nullable=False),
    sa.Column('recorded', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_updated', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resource', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('seq')
    )
    with op.batch_alter_table('provenance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_provenance_recorded'), ['recorded'], unique=False)
        batch_op.create_index(batch_op.f('ix_provenance_target_id'), ['target_id'], unique=False)

    op.create_table('risk_assessment',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('identifier', sa.String(length=128), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('encounter_id', sa.String(length=64), nullable=True),
    sa.Column('model_id', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('risk', sa.String(length=32), nullable=True),
    sa.Column('probability', sa.Float(), nullable=True),
    sa.Column('occurrence', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resource', sa.Text(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('occurrence_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('sort_date', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_updated', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('identifier'),
    sa.UniqueConstraint('seq')
    )
    with op.batch_alter_table('risk_assessment', schema=None) as batch_op:
        batch_op.create_index('ix_risk_assessment_patient_created', ['patient_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_risk_assessment_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_risk_assessment_sort_date'), ['sort_date'], unique=False)

    op.create_table('risk_assessment_version',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('last_updated', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resource', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', 'version_id')
    )
    op.create_table('search_index',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('resource_type', sa.String(length=32), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('param', sa.String(length=64), nullable=False),
    sa.Column('system', sa.String(length=512), nullable=True),
    sa.Column('code', sa.String(length=512), nullable=True),
    sa.Column('number', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('search_index', schema=None) as batch_op:
        batch_op.create_index('ix_search_index_resource', ['resource_type', 'resource_id'], unique=False)
        batch_op.create_index('ix_search_index_value', ['resource_type', 'param', 'code'], unique=False)

    # The chain starts from a known genesis hash; every writer locks and advances this one row.
    chain = sa.table("audit_chain", sa.column("id", sa.Integer), sa.column("seq", sa.Integer),
                     sa.column("hash", sa.String))
    op.bulk_insert(chain, [{"id": 1, "seq": 0, "hash": "0" * 64}])



def downgrade() -> None:
    with op.batch_alter_table('search_index', schema=None) as batch_op:
        batch_op.drop_index('ix_search_index_value')
        batch_op.drop_index('ix_search_index_resource')

    op.drop_table('search_index')
    op.drop_table('risk_assessment_version')
    with op.batch_alter_table('risk_assessment', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_risk_assessment_sort_date'))
        batch_op.drop_index(batch_op.f('ix_risk_assessment_patient_id'))
        batch_op.drop_index('ix_risk_assessment_patient_created')

    op.drop_table('risk_assessment')
    with op.batch_alter_table('provenance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_provenance_target_id'))
        batch_op.drop_index(batch_op.f('ix_provenance_recorded'))

    op.drop_table('provenance')
    op.drop_table('outbox')
    with op.batch_alter_table('cds_jti', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cds_jti_expires_at'))

    op.drop_table('cds_jti')
    with op.batch_alter_table('cds_card_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cds_card_event_patient_id'))
        batch_op.drop_index(batch_op.f('ix_cds_card_event_card_uuid'))

    op.drop_table('cds_card_event')
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_event_recorded'))

    op.drop_table('audit_event')
    op.drop_table('audit_chain')
