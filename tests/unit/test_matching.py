"""PS3.4 C.2.2.2 matching against an index filled through ingest."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import postgresql

from pacs.errors import InvalidQuery
from pacs.query.matching import Level, build_query
from pacs.synthetic import SeriesSpec, make_instance, uid

STUDIES = [
    # study_key, patient id, name, date, time, accession, modalities of its series
    ("s1", "P1", "DOE^JANE", "20250110", "083000", "A100", ["CT", "SR"]),
    ("s2", "P1", "DOE^JANE", "20250220", "120000", "A200", ["MR"]),
    ("s3", "P2", "DOE^JOHN", "20250315", "130059", "A300", ["CT"]),
    ("s4", "P3", "ROE^RICHARD", "20260101", "235959", "B400", ["CT", "MR"]),
    ("s5", "P4", "MOE_X^Y%Z", "", "", "", ["OT"]),
]


def fill(services) -> None:
    for key, pid, name, date, time, acc, modalities in STUDIES:
        for k, modality in enumerate(modalities):
            spec = SeriesSpec(patient_id=pid, patient_name=name, study_key=key, series_key=f"{key}-{k}",
                              modality=modality, rows=8, columns=8, count=2, study_date=date, study_time=time,
                              series_number=k + 1, accession_number=acc)
            for i in range(spec.count):
                services.ingest.store(make_instance(spec, i))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from pacs.services import build_services
    from pacs.settings import Settings

    services = build_services(Settings(data_dir=tmp_path_factory.mktemp("matching")))
    fill(services)
    yield services
    services.close()


def studies(index, **keys) -> set[str]:
    with index.db.session() as session:
        return {s.study_id for s in session.scalars(build_query(Level.STUDY, keys))}


def test_universal_matching(index):
    assert studies(index) == {"s1", "s2", "s3", "s4", "s5"}
    assert studies(index, PatientName="", StudyDate="") == {"s1", "s2", "s3", "s4", "s5"}
    assert studies(index, AccessionNumber="*") == {"s1", "s2", "s3", "s4", "s5"}


def test_single_value_is_exact_and_case_sensitive(index):
    assert studies(index, PatientID="P1") == {"s1", "s2"}
    assert studies(index, PatientName="DOE^JOHN") == {"s3"}
    assert studies(index, PatientName="doe^john") == set()
    assert studies(index, AccessionNumber="A10") == set()


def test_wildcards(index):
    assert studies(index, PatientName="DOE^*") == {"s1", "s2", "s3"}
    assert studies(index, PatientName="DOE^J?HN") == {"s3"}
    assert studies(index, PatientName="*E^*A*") == {"s1", "s2", "s4"}
    assert studies(index, AccessionNumber="?400") == {"s4"}
    # SQL's own wildcard characters are literals in DICOM
    assert studies(index, PatientName="MOE_X^Y%Z") == {"s5"}
    assert studies(index, PatientName="MOE?X*") == {"s5"}
    assert studies(index, PatientName="MO%") == set()


def test_date_ranges(index):
    assert studies(index, StudyDate="20250101-20250301") == {"s1", "s2"}
    assert studies(index, StudyDate="-20250220") == {"s1", "s2"}
    assert studies(index, StudyDate="20250315-") == {"s3", "s4"}
    assert studies(index, StudyDate="20250315") == {"s3"}


def test_time_ranges_include_the_whole_upper_minute(index):
    assert studies(index, StudyTime="1200-1300") == {"s2", "s3"}
    assert studies(index, StudyTime="12") == {"s2"}
    assert studies(index, StudyTime="2359-") == {"s4"}
    assert studies(index, StudyDate="20250101-20251231", StudyTime="-1200") == {"s1", "s2"}


def test_uid_lists(index):
    one, three = uid("s1"), uid("s3")
    assert studies(index, StudyInstanceUID=one) == {"s1"}
    assert studies(index, StudyInstanceUID=f"{one}\\{three}") == {"s1", "s3"}


def test_modalities_in_study(index):
    assert studies(index, ModalitiesInStudy="MR") == {"s2", "s4"}
    assert studies(index, ModalitiesInStudy="SR\\OT") == {"s1", "s5"}
    with index.db.session() as session:
        s4 = session.scalars(build_query(Level.STUDY, {"StudyID": "s4"})).one()
        assert s4.modalities_in_study == "CT\\MR"
        assert (s4.num_series, s4.num_instances) == (2, 4)


def test_levels(index):
    with index.db.session() as session:
        series = session.scalars(build_query(Level.SERIES, {"StudyInstanceUID": uid("s4"), "Modality": "MR"})).all()
        assert [s.series_instance_uid for s in series] == [uid("s4", "s4-1")]
        images = session.scalars(build_query(Level.IMAGE, {"SeriesInstanceUID": uid("s1", "s1-0"),
                                                           "InstanceNumber": "2"})).all()
        assert len(images) == 1 and images[0].rows == 8
        patients = session.scalars(build_query(Level.PATIENT, {"PatientName": "DOE*"})).all()
        assert sorted(p.patient_id for p in patients) == ["P1", "P2"]
        assert {p.patient_id: p.num_studies for p in patients} == {"P1": 2, "P2": 1}


@pytest.mark.parametrize(
    "level, keys, message",
    [
        (Level.STUDY, {"Modality": "CT"}, "below the query level STUDY"),
        (Level.STUDY, {"NoSuchKey": "x"}, "unsupported matching key 'NoSuchKey'"),
        (Level.STUDY, {"StudyDate": "2025-13"}, "expected a date YYYYMMDD, got '2025'"),
        (Level.STUDY, {"StudyDate": "-"}, "at least one bound"),
        (Level.STUDY, {"StudyInstanceUID": "1.2.*"}, "wildcards are not allowed in UIDs"),
        (Level.STUDY, {"StudyInstanceUID": "1.2.abc"}, "not a UID: '1.2.abc'"),
        (Level.SERIES, {"SeriesNumber": "one"}, "expected an integer, got 'one'"),
        (Level.STUDY, {"StudyTime": "1y"}, "expected a time"),
    ],
)
def test_bad_keys_are_named(level, keys, message):
    with pytest.raises(InvalidQuery, match=message):
        build_query(level, keys)


def test_translates_to_indexed_sql_not_python():
    sql = str(build_query(Level.STUDY, {"PatientName": "DOE^*", "StudyDate": "20250101-"}).compile(
        dialect=postgresql.dialect()))
    assert "patients.patient_name LIKE" in sql and "studies.study_date >=" in sql
