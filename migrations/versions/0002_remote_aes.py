"""Remote AEs: the DICOM peers the archive knows (C-MOVE destinations, allow-list).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('remote_aes',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('ae_title', sa.String(length=16), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('may_store', sa.Boolean(), nullable=False),
    sa.Column('may_query', sa.Boolean(), nullable=False),
    sa.Column('may_retrieve', sa.Boolean(), nullable=False),
    sa.Column('description', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_remote_aes')),
    sa.UniqueConstraint('ae_title', name=op.f('uq_remote_aes_ae_title'))
    )


def downgrade() -> None:
    op.drop_table('remote_aes')
