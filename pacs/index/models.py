"""The index schema: the DICOM information model's four levels plus the archive's own tables.

Each attribute column is commented with its DICOM tag and VR.  Dates are kept
as DICOM strings (``YYYYMMDD``) and times normalised to ``HHMMSS.ffffff`` so
that range matching is a plain, indexable string comparison.  Counters
(``num_*``) are maintained on insert so that the ``NumberOf*Related*`` return
keys never need a COUNT over instances.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so migrations are the same on SQLite and Postgres.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)  # VR UI: at most 64 characters
PN = String(324)  # VR PN: up to 64 chars per component group, 5 groups, 3 representations
BigId = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER only


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (
        UniqueConstraint("patient_id", "issuer_of_patient_id"),
        # Pattern ops let Postgres serve wildcard (LIKE 'DOE^%') matches from the index.
        Index("ix_patients_patient_name", "patient_name", postgresql_ops={"patient_name": "varchar_pattern_ops"}),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")  # (0010,0020) LO
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")  # (0010,0021) LO
    patient_name: Mapped[str] = mapped_column(PN, default="")  # (0010,0010) PN
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="", index=True)  # (0010,0030) DA
    patient_sex: Mapped[str] = mapped_column(String(16), default="")  # (0010,0040) CS
    num_studies: Mapped[int] = mapped_column(Integer, default=0)  # (0020,1200) IS
    num_series: Mapped[int] = mapped_column(Integer, default=0)  # (0020,1202) IS
    num_instances: Mapped[int] = mapped_column(Integer, default=0)  # (0020,1204) IS
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(BigId, ForeignKey("patients.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)  # (0020,000D) UI
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)  # (0008,0020) DA
    study_time: Mapped[str] = mapped_column(String(16), default="")  # (0008,0030) TM, normalised
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)  # (0008,0050) SH
    study_id: Mapped[str] = mapped_column(String(16), default="")  # (0020,0010) SH
    study_description: Mapped[str] = mapped_column(String(64), default="")  # (0008,1030) LO
    referring_physician_name: Mapped[str] = mapped_column(PN, default="")  # (0008,0090) PN
    modalities_in_study: Mapped[str] = mapped_column(String(256), default="")  # (0008,0061) CS, '\\'-joined
    num_series: Mapped[int] = mapped_column(Integer, default=0)  # (0020,1206) IS
    num_instances: Mapped[int] = mapped_column(Integer, default=0)  # (0020,1208) IS
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_fk: Mapped[int] = mapped_column(BigId, ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)  # (0020,000E) UI
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)  # (0008,0060) CS
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)  # (0020,0011) IS
    series_description: Mapped[str] = mapped_column(String(64), default="")  # (0008,103E) LO
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")  # (0018,0015) CS
    series_date: Mapped[str] = mapped_column(String(8), default="")  # (0008,0021) DA
    series_time: Mapped[str] = mapped_column(String(16), default="")  # (0008,0031) TM, normalised
    frame_of_reference_uid: Mapped[str] = mapped_column(UID, default="")  # (0020,0052) UI
    num_instances: Mapped[int] = mapped_column(Integer, default=0)  # (0020,1209) IS
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Last time an instance arrived: routing rules wait for a series to be quiet.  Not indexed:
    # every stored instance sets it, and an indexed column would make that update touch every index.
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_packed_stored_at", "packed", "stored_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_fk: Mapped[int] = mapped_column(BigId, ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)  # (0008,0018) UI
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)  # (0008,0016) UI
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)  # (0020,0013) IS
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)  # (0028,0010) US
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)  # (0028,0011) US
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)  # (0028,0008) IS
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)  # (0002,0010) UI, as received
    # Where the original bytes are (see pacs.storage.objects).
    container: Mapped[str] = mapped_column(String(512))
    offset: Mapped[int] = mapped_column(BigInteger)
    length: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # The XXH3-64 that reads verify (pacs.storage.objects); NULL: they verify the SHA-256.
    xxh3: Mapped[str | None] = mapped_column(String(16), nullable=True)
    packed: Mapped[bool] = mapped_column(Boolean, default=False)
    source_ae: Mapped[str] = mapped_column(String(64), default="")
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class ContainerState(str, enum.Enum):
    WRITING = "writing"  # the compactor is writing it; not referenced yet
    OPEN = "open"  # ingest appends to it; every record referenced is durable
    SEALED = "sealed"  # durable and referenced by instance rows


class Container(Base):
    """A pack file; rows in state WRITING left by a crash are swept by the compactor.

    Packs that ingest appends to are OPEN until the process seals them (full,
    or at shutdown); one whose process died stays OPEN and readable.
    """

    __tablename__ = "containers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    path: Mapped[str] = mapped_column(String(512), unique=True)
    state: Mapped[ContainerState] = mapped_column(
        Enum(ContainerState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])
    )
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    object_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sealed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class SupersededObject(Base):
    """Bytes replaced under the overwrite policy: kept, listed, purged only by an admin."""

    __tablename__ = "superseded_objects"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    container: Mapped[str] = mapped_column(String(512))
    offset: Mapped[int] = mapped_column(BigInteger)
    length: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    superseded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Lease(Base):
    """A named lease so that one process at a time runs a maintenance task."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who did what to which object; every modifying admin action writes one."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class RemoteAE(Base):
    """A DICOM peer the archive knows: where it listens and what it may do."""

    __tablename__ = "remote_aes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    ae_title: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    may_store: Mapped[bool] = mapped_column(Boolean, default=True)
    may_query: Mapped[bool] = mapped_column(Boolean, default=True)
    may_retrieve: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
