"""Reads and writes of the index, inside a transaction the caller owns.

Nothing here commits.  Inserts of the parent levels use INSERT ... ON CONFLICT
DO NOTHING so that several ingest processes can create the same patient,
study or series at once without one of them failing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from pacs.index.models import (
    Container,
    ContainerState,
    Instance,
    Patient,
    RemoteAE,
    Series,
    Study,
    SupersededObject,
    utcnow,
)
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


# The ingest hot path executes these prebuilt Core statements on a Connection:
# no ORM unit of work and no statement construction per stored instance, only
# a compiled-cache hit (measured: about a third of the per-instance cost of
# small objects went to building and ORM-executing statements).
_PARENTS = (
    select(Series.id, Study.id, Study.patient_fk)
    .join(Study, Series.study_fk == Study.id)
    .where(Series.series_instance_uid == bindparam("b_series_uid"))
)
# The columns location_of reads: select them with the rest of a query's columns.
LOCATION_COLUMNS = (Instance.container, Instance.offset, Instance.length, Instance.sha256, Instance.xxh3)
_LOCATION = select(*LOCATION_COLUMNS).where(
    Instance.sop_instance_uid == bindparam("b_sop_uid")
)
_BUMP_SERIES = (
    update(Series)
    .where(Series.id == bindparam("b_pk"))
    .values(num_instances=Series.num_instances + 1, updated_at=bindparam("b_now"))
)
_BUMP_STUDY = (
    update(Study)
    .where(Study.id == bindparam("b_pk"))
    .values(num_instances=Study.num_instances + 1, updated_at=bindparam("b_now"))
)
_BUMP_PATIENT = update(Patient).where(Patient.id == bindparam("b_pk")).values(num_instances=Patient.num_instances + 1)
_INSERT_IGNORE: dict[tuple[str, str, bool], Any] = {}


class _OnSqlite:
    """A prebuilt statement compiled once and run on SQLite's own connection.

    On SQLite an ingest statement itself takes a few microseconds; executing
    it through ``Connection.execute`` (cache look-up, execution context,
    result wrapping) took about three quarters of the time ``add_instance``
    spent (py-spy of ``pacs serve`` storing 3,000 small instances).  The
    statement is compiled as ``Connection.execute`` compiles it (with the
    given parameter names as column keys) into its SQL and the ordered bind
    parameters with SQLAlchemy's own bind processors (dates are stored in the
    format SQLAlchemy reads back), then executed on the DBAPI connection of
    the caller's ``Connection``, inside its transaction.  Driver errors are
    raised as SQLAlchemy's, as ``Connection.execute`` would.
    """

    def __init__(self, sql: str, binds: list[tuple[str, Any, Any]]) -> None:
        self._sql = sql
        self._binds = binds

    @classmethod
    def compile(cls, statement: Any, keys: tuple[str, ...], conn: Connection) -> _OnSqlite | None:
        """None for a statement whose missing columns take defaults computed in Python: SQLAlchemy runs those."""
        compiled = statement.compile(dialect=conn.dialect, column_keys=list(keys))
        if compiled.insert_prefetch or compiled.update_prefetch:
            return None
        processors = compiled._bind_processors
        return cls(str(compiled),
                   [(name, processors.get(name), compiled.binds[name].value) for name in compiled.positiontup])

    def run(self, conn: Connection, values: dict[str, Any]) -> Any:
        """The DBAPI cursor of the executed statement."""
        args = []
        for name, process, literal in self._binds:
            value = values.get(name, literal)
            args.append(value if process is None else process(value))
        dbapi = conn.dialect.loaded_dbapi
        try:
            return conn.connection.driver_connection.execute(self._sql, args)
        except dbapi.Error as exc:
            raise DBAPIError.instance(self._sql, args, exc, dbapi.Error) from exc


_ON_SQLITE: dict[tuple[Any, tuple[str, ...]], _OnSqlite | None] = {}  # (statement, parameter names)


def _execute(conn: Connection, statement: Any, values: dict[str, Any]) -> Any:
    """Execute a prebuilt (module-level) statement; the result has ``fetchone()`` and ``rowcount``.

    On SQLite it runs on the driver (:class:`_OnSqlite`, compiled once per
    statement and set of parameter names) unless SQLAlchemy has column
    defaults to compute for it; elsewhere through SQLAlchemy.
    """
    if conn.dialect.name != "sqlite":
        return conn.execute(statement, values)
    key = (statement, tuple(values))
    if key not in _ON_SQLITE:
        _ON_SQLITE[key] = _OnSqlite.compile(statement, key[1], conn)
    prepared = _ON_SQLITE[key]
    if prepared is None:
        return conn.execute(statement, values)
    return prepared.run(conn, values)


def _connection(db: Session | Connection) -> Connection:
    return db.connection() if isinstance(db, Session) else db


def _insert_ignore(conn: Connection, model: type, values: dict[str, Any], returning: Any = None) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING; the new row's ``returning`` column (or 1), None on conflict."""
    dialect = conn.dialect.name
    key = (dialect, model.__tablename__, returning is not None)
    statement = _INSERT_IGNORE.get(key)
    if statement is None:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - only the two supported databases
            raise NotImplementedError(f"index dialect {dialect!r} is not supported")
        statement = insert(model).on_conflict_do_nothing()
        if returning is not None:
            statement = statement.returning(returning)
        _INSERT_IGNORE[key] = statement
    result = _execute(conn, statement, values)
    if returning is None:
        return 1 if result.rowcount == 1 else None
    row = result.fetchone()
    return None if row is None else row[0]


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
    ).one_or_none()


def find_location(db: Session | Connection, sop_instance_uid: str) -> Location | None:
    """Where the bytes of an indexed instance are, or None when the UID is not indexed."""
    row = _execute(_connection(db), _LOCATION, {"b_sop_uid": sop_instance_uid}).fetchone()
    return None if row is None else Location(*row)


def location_of(instance: Instance) -> Location:
    """An instance's location, or a row's that has the ``LOCATION_COLUMNS``."""
    return Location(instance.container, instance.offset, instance.length, instance.sha256, instance.xxh3)


def add_instance(
    db: Session | Connection, attrs: InstanceAttributes, location: Location, *, source_ae: str = ""
) -> int | None:
    """Index a new instance with its parents; return its row id, or None if the UID is there.

    The counters of the series, study and patient are incremented in the same
    transaction.  The common case — the series exists already — costs one
    look-up, one insert and three counter updates.
    """
    conn = _connection(db)
    now = utcnow()
    if conn.dialect.name == "postgresql":
        instance_pk, series = insert_into_indexed_series(conn, attrs, location, source_ae=source_ae, now=now)
        if series is not None:  # the common case: the row, then the counters
            if instance_pk is not None:
                count_in(conn, series, now)
            return instance_pk
    parents = _execute(conn, _PARENTS, {"b_series_uid": attrs.series_instance_uid}).fetchone()
    new_study = new_series = False
    if parents is None:
        series_pk, study_pk, patient_pk, new_study, new_series = _add_parents(conn, attrs, now)
    else:
        series_pk, study_pk, patient_pk = parents
    instance_pk = _insert_ignore(
        conn, Instance, dict(series_fk=series_pk, **_instance_values(attrs, location, source_ae, now)),
        returning=Instance.id,
    )
    if instance_pk is None:
        return None
    # Counters, each bumped only by the transaction that created the row below it.
    _execute(conn, _BUMP_SERIES, {"b_pk": series_pk, "b_now": now})
    if new_series or new_study:
        study_values: dict[str, Any] = dict(num_instances=Study.num_instances + 1, updated_at=now)
        patient_values: dict[str, Any] = dict(num_instances=Patient.num_instances + 1)
        if new_series:
            study_values["num_series"] = Study.num_series + 1
            patient_values["num_series"] = Patient.num_series + 1
        if new_study:
            patient_values["num_studies"] = Patient.num_studies + 1
        conn.execute(update(Study).where(Study.id == study_pk).values(**study_values))
        conn.execute(update(Patient).where(Patient.id == patient_pk).values(**patient_values))
    else:
        _execute(conn, _BUMP_STUDY, {"b_pk": study_pk, "b_now": now})
        _execute(conn, _BUMP_PATIENT, {"b_pk": patient_pk})
    if new_series and attrs.modality:
        _add_modality(conn, study_pk, attrs.modality)
    return instance_pk


@dataclass(frozen=True)
class IndexedSeries:
    """The ids of an indexed series and of its study and patient (whose counters an added instance bumps)."""

    series_pk: int
    study_pk: int
    patient_pk: int


def insert_into_indexed_series(
    conn: Connection, attrs: InstanceAttributes, location: Location, *, source_ae: str = "", now: datetime,
    begin: bool = False,
) -> tuple[int | None, IndexedSeries | None]:
    """Postgres: insert the row of an instance of a series already indexed, in one statement; counters untouched.

    Returns (the new row's id, or None if the UID is there; the series, or
    None when it is not indexed, and then nothing was written and
    :func:`add_instance` must do it).  Meant for a transaction whose other
    work waits for something else (the flush of the instance's bytes):
    the row takes no lock that a concurrent store into the series waits
    for.  :func:`count_in_and_commit` then bumps the counters and commits.
    ``begin``: the ``BEGIN`` of that transaction, begun by hand on an
    autocommit connection, goes in the same round trip.
    """
    values = _instance_values(attrs, location, source_ae, now)
    params = {**{f"b_{k}": v for k, v in values.items()}, "b_series_uid": attrs.series_instance_uid}
    if begin:
        row = _PgBegun.of(_pg_insert_into_series(), conn).run(conn, params).one_or_none()
    else:
        row = conn.execute(_pg_insert_into_series(), params).one_or_none()
    if row is None:
        return None, None
    instance_pk, *parents = row
    return instance_pk, IndexedSeries(*parents)


def count_in(conn: Connection, series: IndexedSeries, now: datetime, *, commit: bool = False) -> None:
    """Postgres: bump the counters for one more instance of ``series``, in one round trip.

    The rows are locked series, study, patient, the order of every path that
    bumps them.  ``commit``: the ``COMMIT`` goes in the same round trip, on a
    connection in a transaction begun by hand
    (:func:`pacs.index.database.explicit_transaction`).
    """
    conn.exec_driver_sql(_COUNT_IN_AND_COMMIT if commit else _COUNT_IN,
                         {"now": now, "series": series.series_pk, "study": series.study_pk,
                          "patient": series.patient_pk})


def count_in_and_commit(conn: Connection, series: IndexedSeries, now: datetime) -> None:
    """:func:`count_in` with the ``COMMIT`` of the transaction begun by hand, in one round trip."""
    count_in(conn, series, now, commit=True)


_COUNT_IN = (
    "UPDATE series SET num_instances = num_instances + 1, updated_at = %(now)s WHERE id = %(series)s; "
    "UPDATE studies SET num_instances = num_instances + 1, updated_at = %(now)s WHERE id = %(study)s; "
    "UPDATE patients SET num_instances = num_instances + 1 WHERE id = %(patient)s"
)
_COUNT_IN_AND_COMMIT = _COUNT_IN + "; COMMIT"


def _instance_values(attrs: InstanceAttributes, location: Location, source_ae: str, now: datetime) -> dict[str, Any]:
    """The columns of a new instance row, but its series."""
    return dict(
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
        xxh3=location.xxh3,
        packed=not location.is_landing,
        source_ae=source_ae,
        stored_at=now,
    )


_INSTANCE_COLUMNS = tuple(
    _instance_values(
        InstanceAttributes(**{f: None for f in InstanceAttributes.__dataclass_fields__}),
        Location("", 0, 0, ""), "", datetime.min,
    )
)


class _PgBegun:
    """A prebuilt Postgres statement sent as ``BEGIN; <statement>``: one round trip for both.

    Compiled once for the connection's dialect (psycopg2's named
    placeholders) with SQLAlchemy's bind processors, and sent as one simple
    query, whose result is the statement's.
    """

    _compiled: dict[Any, _PgBegun] = {}

    def __init__(self, sql: str, processors: dict[str, Any]) -> None:
        self._sql = sql
        self._processors = processors

    @classmethod
    def of(cls, statement: Any, conn: Connection) -> _PgBegun:
        begun = cls._compiled.get(statement)
        if begun is None:
            compiled = statement.compile(dialect=conn.dialect)
            begun = cls._compiled[statement] = cls("BEGIN; " + str(compiled), dict(compiled._bind_processors))
        return begun

    def run(self, conn: Connection, values: dict[str, Any]) -> Any:
        processed = {name: (value if (process := self._processors.get(name)) is None else process(value))
                     for name, value in values.items()}
        return conn.exec_driver_sql(self._sql, processed)


@functools.cache
def _pg_insert_into_series() -> Any:
    """One Postgres statement: the row of an instance of a series already indexed, and the series' parents.

    A data-modifying CTE inserts the row (ON CONFLICT DO NOTHING); the result
    is (new row id or NULL, series id, study id, patient id), or no row when
    the series is not indexed (nothing was written).
    """
    from sqlalchemy.dialects.postgresql import insert

    parents = (
        select(Series.id.label("series_pk"), Study.id.label("study_pk"), Study.patient_fk.label("patient_pk"))
        .join(Study, Series.study_fk == Study.id)
        .where(Series.series_instance_uid == bindparam("b_series_uid"))
        .cte("parents")
    )
    columns = [getattr(Instance, c) for c in _INSTANCE_COLUMNS]
    added = (
        insert(Instance)
        .from_select(
            ["series_fk", *_INSTANCE_COLUMNS],
            select(parents.c.series_pk, *(bindparam(f"b_{c}", type_=col.type) for c, col in zip(_INSTANCE_COLUMNS, columns))),
        )
        .on_conflict_do_nothing()
        .returning(Instance.id)
        .cte("added")
    )
    return select(select(added.c.id).scalar_subquery(), parents.c.series_pk, parents.c.study_pk, parents.c.patient_pk)


def _add_parents(
    conn: Connection, attrs: InstanceAttributes, now: datetime
) -> tuple[int, int, int, bool, bool]:
    """Create (or find) the patient, study and series of a new series' first instance."""
    _insert_ignore(
        conn,
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
    patient_pk = conn.scalar(
        select(Patient.id).where(
            Patient.patient_id == attrs.patient_id,
            Patient.issuer_of_patient_id == attrs.issuer_of_patient_id,
        )
    )
    new_study = _insert_ignore(
        conn,
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
    study_pk, patient_pk = conn.execute(
        select(Study.id, Study.patient_fk).where(Study.study_instance_uid == attrs.study_instance_uid)
    ).one()
    new_series = _insert_ignore(
        conn,
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
    series_pk = conn.scalar(
        select(Series.id).where(Series.series_instance_uid == attrs.series_instance_uid)
    )
    return series_pk, study_pk, patient_pk, new_study, new_series


def _add_modality(conn: Connection, study_pk: int, modality: str) -> None:
    # Lock the study row (Postgres) so concurrent new series do not lose a
    # modality: FOR NO KEY UPDATE, the lock the counters' UPDATE of the row
    # already holds.  FOR UPDATE would also wait for the KEY SHARE lock that a
    # concurrent transaction's new series row takes on its study (the foreign
    # key), while that transaction waits for this one's to update the study's
    # counters: a deadlock, seen with the first instances of several series of
    # one study stored at once.
    current = conn.scalar(
        select(Study.modalities_in_study).where(Study.id == study_pk).with_for_update(key_share=True)
    )
    modalities = set(filter(None, (current or "").split("\\")))
    if modality not in modalities:
        modalities.add(modality)
        conn.execute(
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
    instance.xxh3 = location.xxh3
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


def record_open_pack(session: Session, path: str) -> None:
    """A pack that ingest is about to append to."""
    session.add(Container(path=path, state=ContainerState.OPEN, created_at=utcnow()))


def record_sealed_pack(session: Session, path: str, size_bytes: int, object_count: int) -> None:
    """An appended pack that is closed for good."""
    session.execute(
        update(Container)
        .where(Container.path == path)
        .values(state=ContainerState.SEALED, size_bytes=size_bytes, object_count=object_count, sealed_at=utcnow())
    )


def open_packs(session: Session) -> list[str]:
    """Paths of the packs still recorded as appended to, oldest first."""
    return list(
        session.scalars(
            select(Container.path).where(Container.state == ContainerState.OPEN).order_by(Container.id)
        )
    )


def pack_is_open(session: Session, path: str) -> bool:
    return session.scalar(select(Container.state).where(Container.path == path)) == ContainerState.OPEN


def referenced_offsets(session: Session, container: str) -> set[int]:
    """Offsets of the records of ``container`` that an instance (current or superseded) points at."""
    current = select(Instance.offset).where(Instance.container == container)
    superseded = select(SupersededObject.offset).where(SupersededObject.container == container)
    return set(session.scalars(current.union(superseded)))
