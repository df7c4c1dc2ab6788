"""cds_card_event.suggestions: the uuids of the suggestions an issued card offered, so feedback that accepts a
suggestion the card never had is refused (CDS Hooks 2.0.1: acceptedSuggestions[].id is "the card.suggestion.uuid
from the CDS Hooks response"). Rows stored before keep NULL (nothing recorded); ``audit.row_digest`` leaves a
NULL out, so their recorded sha256 still verifies.

Revision ID: 0009_card_suggestions
Revises: 0008_job_item_claims
Create Date: 2026-11-28
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009_card_suggestions'
down_revision = '0008_job_item_claims'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cds_card_event') as batch:
        batch.add_column(sa.Column('suggestions', sa.Text(), nullable=True))


def downgrade() -> None:
    # The audit trail's sha256 of each card issued since this revision covers its suggestions: dropping them
    # would make `fhir-ai audit verify` report every such card as altered, for good. Refuse instead.
    recorded = op.get_bind().execute(
        sa.text("SELECT count(*) FROM cds_card_event WHERE suggestions IS NOT NULL")).scalar()
    if recorded:
        raise RuntimeError(f"cannot downgrade below 0009_card_suggestions: {recorded} issued card(s) have their "
                           "suggestions recorded, and the audit trail's digests cover them (dropping the column "
                           "would make `fhir-ai audit verify` report them as altered)")
    with op.batch_alter_table('cds_card_event') as batch:
        batch.drop_column('suggestions')
