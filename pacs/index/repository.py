"""Reads and writes of the index, inside a transaction the caller owns.

Nothing here commits.  Inserts of the parent levels use INSERT ... ON CONFLICT
DO NOTHING so that several ingest processes can create the same patient,
study or series at once without one of them failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pacs.index.models import Instance, Patient, RemoteAE, Series, Study, SupersededObject, utcnow
from pacs.storage.objects import Location


@dataclass(frozen=True)
class InstanceAttributes:
    """What the index keeps of one instance, parsed from its header."""

    # Patient level
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    # Study level
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    # Series level
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    series_date: str
    series_time: str
    frame_of_reference_uid: str
    # Instance level
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    transfer_syntax_uid: str


def _insert_ignore(session: Session, model: type, values: dict[str, Any], returning: Any = None) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING; the new row's ``returning`` column (or 1), None on conflict."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only the two supported databases
        raise NotImplementedError(f"index dialect {dialect!r} is not supported")
    statement = insert(model).values(**values).on_conflict_do_nothing()
    if returning is None:
        return 1 if session.execute(statement).rowcount == 1 else None
    return session.execute(statement.returning(returning)).scalar_one_or_none()


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
    ).one_or_none()


def location_of(instance: Instance) -> Location:
    return Location(instance.container, instance.offset, instance.length, instance.sha256)


def add_instance(
    session: Session, attrs: InstanceAttributes, location: Location, *, source_ae: str = ""
) -> int | None:
    """Index a new instance with its parents; return its row id, or None if the UID is there.

    The counters of the series, study and patient are incremented in the same
    transaction.  The common case — the series exists already — costs one
    look-up, one insert and three counter updates.
    """
    now = utcnow()
    parents = session.execute(
        select(Series.id, Study.id, Study.patient_fk)
        .join(Study, Series.study_fk == Study.id)
        .where(Series.series_instance_uid == attrs.series_instance_uid)
    ).one_or_none()
    new_study = new_series = False
    if parents is None:
        series_pk, study_pk, patient_pk, new_study, new_series = _add_parents(session, attrs, now)
    else:
        series_pk, study_pk, patient_pk = parents
    instance_pk = _insert_ignore(
        session,
        Instance,
        dict(
            series_fk=series_pk,
            sop_instance_uid=attrs.sop_instance_uid,
            sop_class_uid=attrs.sop_class_uid,
            instance_number=attrs.instance_number,
            rows=attrs.rows,
            columns=attrs.columns,
            number_of_frames=attrs.number_of_frames,
            transfer_syntax_uid=attrs.transfer_syntax_uid,
            container=location.container,
            offset=location.offset,
            length=location.length,
            sha256=location.sha256,
            packed=not location.is_landing,
            source_ae=source_ae,
            stored_at=now,
        ),
        returning=Instance.id,
    )
    if instance_pk is None:
        return None
    # Counters, each bumped only by the transaction that created the row below it.
    session.execute(
        update(Series)
        .where(Series.id == series_pk)
        .values(num_instances=Series.num_instances + 1, updated_at=now)
    )
    study_values: dict[str, Any] = dict(num_instances=Study.num_instances + 1, updated_at=now)
    patient_values: dict[str, Any] = dict(num_instances=Patient.num_instances + 1)
    if new_series:
        study_values["num_series"] = Study.num_series + 1
        patient_values["num_series"] = Patient.num_series + 1
    if new_study:
        patient_values["num_studies"] = Patient.num_studies + 1
    session.execute(update(Study).where(Study.id == study_pk).values(**study_values))
    session.execute(update(Patient).where(Patient.id == patient_pk).values(**patient_values))
    if new_series and attrs.modality:
        _add_modality(session, study_pk, attrs.modality)
    return instance_pk


def _add_parents(
    session: Session, attrs: InstanceAttributes, now: datetime
) -> tuple[int, int, int, bool, bool]:
    """Create (or find) the patient, study and series of a new series' first instance."""
    _insert_ignore(
        session,
        Patient,
        dict(
            patient_id=attrs.patient_id,
            issuer_of_patient_id=attrs.issuer_of_patient_id,
            patient_name=attrs.patient_name,
            patient_birth_date=attrs.patient_birth_date,
            patient_sex=attrs.patient_sex,
            num_studies=0,
            num_series=0,
            num_instances=0,
            created_at=now,
        ),
    )
    patient_pk = session.scalar(
        select(Patient.id).where(
            Patient.patient_id == attrs.patient_id,
            Patient.issuer_of_patient_id == attrs.issuer_of_patient_id,
        )
    )
    new_study = _insert_ignore(
        session,
        Study,
        dict(
            patient_fk=patient_pk,
            study_instance_uid=attrs.study_instance_uid,
            study_date=attrs.study_date,
            study_time=attrs.study_time,
            accession_number=attrs.accession_number,
            study_id=attrs.study_id,
            study_description=attrs.study_description,
            referring_physician_name=attrs.referring_physician_name,
            modalities_in_study="",
            num_series=0,
            num_instances=0,
            created_at=now,
            updated_at=now,
        ),
    ) is not None
    study_pk, patient_pk = session.execute(
        select(Study.id, Study.patient_fk).where(Study.study_instance_uid == attrs.study_instance_uid)
    ).one()
    new_series = _insert_ignore(
        session,
        Series,
        dict(
            study_fk=study_pk,
            series_instance_uid=attrs.series_instance_uid,
            modality=attrs.modality,
            series_number=attrs.series_number,
            series_description=attrs.series_description,
            body_part_examined=attrs.body_part_examined,
            series_date=attrs.series_date,
            series_time=attrs.series_time,
            frame_of_reference_uid=attrs.frame_of_reference_uid,
            num_instances=0,
            created_at=now,
            updated_at=now,
        ),
    ) is not None
    series_pk = session.scalar(
        select(Series.id).where(Series.series_instance_uid == attrs.series_instance_uid)
    )
    return series_pk, study_pk, patient_pk, new_study, new_series


def _add_modality(session: Session, study_pk: int, modality: str) -> None:
    # Lock the study row (Postgres) so concurrent new series do not lose a modality.
    current = session.scalar(
        select(Study.modalities_in_study).where(Study.id == study_pk).with_for_update()
    )
    modalities = set(filter(None, (current or "").split("\\")))
    if modality not in modalities:
        modalities.add(modality)
        session.execute(
            update(Study)
            .where(Study.id == study_pk)
            .values(modalities_in_study="\\".join(sorted(modalities)))
        )


def replace_location(
    session: Session, instance: Instance, location: Location, attrs: InstanceAttributes
) -> Location:
    """Point an instance at new bytes (overwrite policy); the old location is recorded."""
    old = location_of(instance)
    session.add(
        SupersededObject(
            sop_instance_uid=instance.sop_instance_uid,
            container=old.container,
            offset=old.offset,
            length=old.length,
            sha256=old.sha256,
        )
    )
    instance.container = location.container
    instance.offset = location.offset
    instance.length = location.length
    instance.sha256 = location.sha256
    instance.packed = not location.is_landing
    instance.transfer_syntax_uid = attrs.transfer_syntax_uid
    instance.stored_at = utcnow()
    return old


def landing_totals(session: Session) -> tuple[int, int]:
    """(object count, byte count) of the instances still in the landing area."""
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(Instance.length), 0)).where(Instance.packed.is_(False))
    ).one()
    return int(count), int(size)


def oldest_landing(session: Session) -> datetime | None:
    return session.scalar(select(func.min(Instance.stored_at)).where(Instance.packed.is_(False)))


def find_remote_ae(session: Session, ae_title: str) -> RemoteAE | None:
    return session.scalars(select(RemoteAE).where(RemoteAE.ae_title == ae_title.strip())).one_or_none()


def list_remote_aes(session: Session) -> list[RemoteAE]:
    return list(session.scalars(select(RemoteAE).order_by(RemoteAE.ae_title)))
