"""The prebuilt index statements SQLite runs on its own connection (``pacs.index.repository._execute``)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import OperationalError

from pacs.index.models import Instance, Patient, Series, Study
from pacs.index.repository import _LOCATION, _ON_SQLITE, _execute, find_location, location_of
from pacs.ingest.service import StoreOutcome
from pacs.synthetic import SeriesSpec, make_series


def test_rows_written_on_the_driver_read_back_as_those_sqlalchemy_writes(embedded):
    sent = list(make_series(SeriesSpec(study_key="drv", series_key="drv-1", rows=16, columns=16, count=3)))
    assert [embedded.ingest.store(data).outcome for data in sent] == [StoreOutcome.STORED] * 3
    assert any(key[0] is _LOCATION and prepared is not None for key, prepared in _ON_SQLITE.items())
    with embedded.db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert [embedded.objects.get(location_of(row)) for row in rows] == sent
        # a row written by SQLAlchemy itself, for comparison
        first = rows[0]
        copied = {c: getattr(first, c) for c in ("series_fk", "sop_class_uid", "transfer_syntax_uid", "container",
                                                  "offset", "length", "sha256", "packed", "source_ae", "stored_at")}
        session.add(Instance(sop_instance_uid="1.2.3.4.5", **copied))
        session.flush()
        raw = session.execute(text("SELECT stored_at, typeof(packed), packed FROM instances ORDER BY id")).all()
        assert len({(len(stamp), kind, packed) for stamp, kind, packed in raw}) == 1, raw  # one storage format
        series, study, patient = (session.scalars(select(m)).one() for m in (Series, Study, Patient))
        assert series.num_instances == study.num_instances == patient.num_instances == 3
        assert (study.num_series, patient.num_series, patient.num_studies) == (1, 1, 1)
        assert series.updated_at >= first.stored_at and patient.created_at <= first.stored_at
        for row in rows:
            assert find_location(session, row.sop_instance_uid) == location_of(row)
        assert find_location(session, "1.2.3.4") is None
        session.rollback()
    assert embedded.ingest.store(sent[1]).outcome is StoreOutcome.DUPLICATE  # the UID found on the driver
    with embedded.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3


def test_a_statement_with_defaults_computed_in_python_is_left_to_sqlalchemy(embedded):
    statement = insert(Patient).on_conflict_do_nothing()
    with embedded.db.transaction() as conn:
        assert _execute(conn, statement, {"patient_id": "P1", "patient_name": "A^B"}).rowcount == 1
    assert _ON_SQLITE[(statement, ("patient_id", "patient_name"))] is None
    with embedded.db.session() as session:
        patient = session.scalars(select(Patient)).one()
        assert (patient.num_studies, patient.num_instances, patient.patient_sex) == (0, 0, "")
        assert patient.created_at is not None  # utcnow(), called by SQLAlchemy at the insert


def test_driver_errors_surface_as_sqlalchemys(embedded):
    with embedded.db.engine.connect() as conn:
        conn.execute(text("ALTER TABLE instances RENAME TO instances_away"))
        try:
            with pytest.raises(OperationalError, match="no such table: instances"):
                _execute(conn, _LOCATION, {"b_sop_uid": "1.2.3"})
        finally:
            conn.execute(text("ALTER TABLE instances_away RENAME TO instances"))
            conn.commit()
