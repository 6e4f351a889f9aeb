"""Series: ``updated_at`` no longer indexed.

Every stored instance sets its series' ``updated_at``.  Indexed, that made
each of those counter updates a new entry in every index of ``series``
(Postgres cannot update a row in place, "HOT", when an indexed column
changes), and the indexes of a series being stored grew by one dead entry
per instance until vacuumed.  Nothing looks series up by it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series') as batch:
        batch.drop_index('ix_series_updated_at')


def downgrade() -> None:
    with op.batch_alter_table('series') as batch:
        batch.create_index('ix_series_updated_at', ['updated_at'], unique=False)
