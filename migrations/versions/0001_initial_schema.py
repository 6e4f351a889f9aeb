"""Initial schema: patients, studies, series, instances, containers, leases, audit log.

Revision ID: 0001
Revises: 
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=256), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_log_at'), ['at'], unique=False)

    op.create_table('containers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('path', sa.String(length=512), nullable=False),
    sa.Column('state', sa.Enum('writing', 'sealed', name='containerstate', native_enum=False, length=16), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('object_count', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sealed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_containers')),
    sa.UniqueConstraint('path', name=op.f('uq_containers_path'))
    )
    op.create_table('leases',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=128), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_leases'))
    )
    op.create_table('patients',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=False),
    sa.Column('patient_birth_date', sa.String(length=8), nullable=False),
    sa.Column('patient_sex', sa.String(length=16), nullable=False),
    sa.Column('num_studies', sa.Integer(), nullable=False),
    sa.Column('num_series', sa.Integer(), nullable=False),
    sa.Column('num_instances', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patients')),
    sa.UniqueConstraint('patient_id', 'issuer_of_patient_id', name=op.f('uq_patients_patient_id_issuer_of_patient_id'))
    )
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_patients_patient_birth_date'), ['patient_birth_date'], unique=False)
        batch_op.create_index('ix_patients_patient_name', ['patient_name'], unique=False, postgresql_ops={'patient_name': 'varchar_pattern_ops'})

    op.create_table('superseded_objects',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('container', sa.String(length=512), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('length', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('superseded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_superseded_objects'))
    )
    with op.batch_alter_table('superseded_objects', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_superseded_objects_sop_instance_uid'), ['sop_instance_uid'], unique=False)

    op.create_table('studies',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('patient_fk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_date', sa.String(length=8), nullable=False),
    sa.Column('study_time', sa.String(length=16), nullable=False),
    sa.Column('accession_number', sa.String(length=16), nullable=False),
    sa.Column('study_id', sa.String(length=16), nullable=False),
    sa.Column('study_description', sa.String(length=64), nullable=False),
    sa.Column('referring_physician_name', sa.String(length=324), nullable=False),
    sa.Column('modalities_in_study', sa.String(length=256), nullable=False),
    sa.Column('num_series', sa.Integer(), nullable=False),
    sa.Column('num_instances', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_fk'], ['patients.id'], name=op.f('fk_studies_patient_fk_patients')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_studies')),
    sa.UniqueConstraint('study_instance_uid', name=op.f('uq_studies_study_instance_uid'))
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_studies_accession_number'), ['accession_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_studies_patient_fk'), ['patient_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_studies_study_date'), ['study_date'], unique=False)

    op.create_table('series',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('study_fk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.Column('series_description', sa.String(length=64), nullable=False),
    sa.Column('body_part_examined', sa.String(length=16), nullable=False),
    sa.Column('series_date', sa.String(length=8), nullable=False),
    sa.Column('series_time', sa.String(length=16), nullable=False),
    sa.Column('frame_of_reference_uid', sa.String(length=64), nullable=False),
    sa.Column('num_instances', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_fk'], ['studies.id'], name=op.f('fk_series_study_fk_studies')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_series')),
    sa.UniqueConstraint('series_instance_uid', name=op.f('uq_series_series_instance_uid'))
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_series_modality'), ['modality'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_study_fk'), ['study_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_updated_at'), ['updated_at'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('series_fk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('rows', sa.Integer(), nullable=True),
    sa.Column('columns', sa.Integer(), nullable=True),
    sa.Column('number_of_frames', sa.Integer(), nullable=True),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('container', sa.String(length=512), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('length', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('packed', sa.Boolean(), nullable=False),
    sa.Column('source_ae', sa.String(length=64), nullable=False),
    sa.Column('stored_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['series_fk'], ['series.id'], name=op.f('fk_instances_series_fk_series')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instances')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_instances_sop_instance_uid'))
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index('ix_instances_packed_stored_at', ['packed', 'stored_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_instances_series_fk'), ['series_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_instances_sop_class_uid'), ['sop_class_uid'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_sop_class_uid'))
        batch_op.drop_index(batch_op.f('ix_instances_series_fk'))
        batch_op.drop_index('ix_instances_packed_stored_at')

    op.drop_table('instances')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_updated_at'))
        batch_op.drop_index(batch_op.f('ix_series_study_fk'))
        batch_op.drop_index(batch_op.f('ix_series_modality'))

    op.drop_table('series')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_studies_study_date'))
        batch_op.drop_index(batch_op.f('ix_studies_patient_fk'))
        batch_op.drop_index(batch_op.f('ix_studies_accession_number'))

    op.drop_table('studies')
    with op.batch_alter_table('superseded_objects', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_superseded_objects_sop_instance_uid'))

    op.drop_table('superseded_objects')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_index('ix_patients_patient_name', postgresql_ops={'patient_name': 'varchar_pattern_ops'})
        batch_op.drop_index(batch_op.f('ix_patients_patient_birth_date'))

    op.drop_table('patients')
    op.drop_table('leases')
    op.drop_table('containers')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_at'))

    op.drop_table('audit_log')
