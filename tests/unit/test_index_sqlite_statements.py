"""The ingest statements SQLite runs on its own connection (``pacs.index.repository._OnSqlite``)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from pacs.index.models import Instance, Patient, Series, Study
from pacs.index.repository import _SQLITE_LOCATION, find_location, location_of
from pacs.ingest.service import StoreOutcome
from pacs.synthetic import SeriesSpec, make_series


def test_rows_written_on_the_driver_read_back_as_those_sqlalchemy_writes(embedded):
    # the first instance of a series takes the general path (new parents), the rest the driver's
    sent = list(make_series(SeriesSpec(study_key="drv", series_key="drv-1", rows=16, columns=16, count=3)))
    assert [embedded.ingest.store(data).outcome for data in sent] == [StoreOutcome.STORED] * 3
    with embedded.db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert [embedded.objects.get(location_of(row)) for row in rows] == sent
        first, *rest = rows
        for row in rest:
            assert (row.packed, row.source_ae, row.transfer_syntax_uid) == (first.packed, first.source_ae,
                                                                              first.transfer_syntax_uid)
            assert type(row.stored_at) is type(first.stored_at) and row.stored_at >= first.stored_at
        raw = session.execute(text("SELECT stored_at, typeof(packed) FROM instances ORDER BY id")).all()
        assert len({(len(stamp), kind) for stamp, kind in raw}) == 1, raw  # one storage format for all
        series, study, patient = (session.scalars(select(m)).one() for m in (Series, Study, Patient))
        assert series.num_instances == study.num_instances == patient.num_instances == 3
        assert series.updated_at >= first.stored_at
        for row in rows:
            assert find_location(session, row.sop_instance_uid) == location_of(row)
        assert find_location(session, "1.2.3.4") is None
    assert embedded.ingest.store(sent[1]).outcome is StoreOutcome.DUPLICATE  # the UID found on the driver
    with embedded.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3


def test_driver_errors_surface_as_sqlalchemys(embedded):
    with embedded.db.engine.connect() as conn:
        conn.execute(text("ALTER TABLE instances RENAME TO instances_away"))
        try:
            with pytest.raises(OperationalError, match="no such table: instances"):
                _SQLITE_LOCATION.run(conn, {"b_sop_uid": "1.2.3"})
        finally:
            conn.execute(text("ALTER TABLE instances_away RENAME TO instances"))
            conn.commit()
