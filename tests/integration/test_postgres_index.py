"""The index on the real Postgres: migrations by the CLI, and the same matching tests as SQLite."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, func, text

from pacs.devstack import PG_URL, empty_database
from pacs.index.database import Database
from pacs.index.migrate import drift
from pacs.services import build_services
from pacs.settings import Settings
from pacs.synthetic import SeriesSpec, make_series
from tests.unit import test_matching
from tests.unit.test_matching import (  # noqa: F401  (collected here, against Postgres)
    test_date_ranges,
    test_levels,
    test_modalities_in_study,
    test_single_value_is_exact_and_case_sensitive,
    test_time_ranges_include_the_whole_upper_minute,
    test_uid_lists,
    test_universal_matching,
    test_wildcards,
)

pytestmark = [pytest.mark.postgres]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from tests.integration.conftest import _need

    _need(PG_URL, "Postgres")
    empty_database(PG_URL)
    services = build_services(Settings(data_dir=tmp_path_factory.mktemp("pg"), index={"url": PG_URL}))
    test_matching.fill(services)
    yield services
    services.close()


def test_cli_migrates_postgres(pg_url, tmp_path):
    env = {**os.environ, "PACS_INDEX_URL": pg_url, "PACS_DATA_DIR": str(tmp_path)}
    pacs = [sys.executable, "-m", "pacs.cli.main"]
    done = subprocess.run([*pacs, "db", "current"], env=env, capture_output=True, text=True)
    assert done.returncode == 1  # empty database: an upgrade is due
    done = subprocess.run([*pacs, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*pacs, "db", "current"], env=env, capture_output=True, text=True)
    from pacs.index.migrate import head_revision

    head = head_revision()
    assert done.returncode == 0 and done.stdout.startswith(head)
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        indexdef = conn.execute(text(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_patients_patient_name'")).scalar_one()
    engine.dispose()
    assert "varchar_pattern_ops" in indexdef
    db = Database(pg_url)
    try:
        assert drift(db) == []  # the migrations build the models' schema on Postgres too
    finally:
        db.dispose()


def test_counter_updates_of_a_series_are_made_in_place(pg_url, tmp_path):
    """Each stored instance bumps its series', study's and patient's counters: Postgres must do that as a
    heap-only ("HOT") update, which adds nothing to the table's indexes, so no column it sets may be indexed."""
    count = 30
    services = build_services(Settings(data_dir=tmp_path, index={"url": pg_url}))
    try:
        for blob in make_series(SeriesSpec(rows=16, columns=16, count=count)):
            services.ingest.store(blob)
    finally:
        services.close()  # the server sessions end, and with them their statistics are reported
    engine = create_engine(pg_url)
    query = text("SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                 "WHERE relname IN ('series', 'studies', 'patients') ORDER BY relname")
    try:
        for _ in range(50):
            with engine.connect() as conn:
                rows = conn.execute(query).all()
            if rows and all(updated >= count - 1 for _, updated, _ in rows):
                break
            time.sleep(0.1)
    finally:
        engine.dispose()
    assert [name for name, _, _ in rows] == ["patients", "series", "studies"]
    for name, updated, in_place in rows:
        assert updated >= count - 1 and in_place == updated, (name, updated, in_place)


def test_wildcard_match_uses_an_index_on_postgres(index):
    from pacs.query.matching import Level, build_query

    query = build_query(Level.PATIENT, {"PatientName": "DOE^*"})
    with index.db.session() as session:
        session.execute(text("SET enable_seqscan = off"))
        compiled = query.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
        plan = "\n".join(r[0] for r in session.execute(text(f"EXPLAIN {compiled}")))
    assert "ix_patients_patient_name" in plan, plan


def test_an_instance_of_a_known_series_commits_with_its_counters_in_one_round_trip(pg_url, tmp_path):
    """Postgres's path for a series indexed already counts like the general path, and once."""
    from sqlalchemy import event, select

    from pacs.index.models import Instance, Patient, Series, Study
    from pacs.index.repository import add_instance
    from pacs.ingest.parse import read_attributes
    from pacs.storage.objects import Location
    from pacs.synthetic import SeriesSpec, make_series

    services = build_services(Settings(data_dir=tmp_path / "data", index={"url": pg_url}))
    statements = []

    def seen(conn, _cursor, statement, *_):  # noqa: ANN001
        statements.append((" ".join(statement.split()[:2]), conn.connection.driver_connection.autocommit))

    for engine in (services.db.engine, services.db._autocommit):
        event.listen(engine, "before_cursor_execute", seen)
    try:
        for key in ("s1", "s2"):  # two series of one study
            for data in make_series(SeriesSpec(study_key="one", series_key=key, rows=16, columns=16, count=3)):
                statements.clear()
                services.ingest.store(data)
        # the last store: the look-up (committing alone), then on the same connection a
        # transaction begun by hand with the row in one round trip (sent while the flush runs),
        # then the counters and the COMMIT in one round trip
        assert statements == [("SELECT instances.container,", True), ("BEGIN; WITH", True), ("UPDATE series", True)]
        attrs = read_attributes(io.BytesIO(data), len(data))
        with services.db.transaction() as conn:  # the same UID again: nothing added, nothing counted
            assert add_instance(conn, attrs, Location("packs/x", 0, len(data), "0" * 64)) is None
        with services.db.session() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 6
            assert sorted(session.scalars(select(Series.num_instances))) == [3, 3]
            study = session.scalars(select(Study)).one()
            patient = session.scalars(select(Patient)).one()
            assert (study.num_instances, study.num_series) == (6, 2)
            assert (patient.num_instances, patient.num_series, patient.num_studies) == (6, 2, 1)
    finally:
        services.close()


def test_parallel_stores_into_new_series_of_one_study_never_deadlock(pg_url, tmp_path):
    """Associations of one scanner start a study at once: the first instances of a series
    (created in a transaction) and the next ones (one statement) lock the series, study and
    patient rows in one order and mode, so none of them fails with a deadlock.  Rounds of two
    series one after the other, then rounds of four series interleaved, whose first instances
    run at once (before the study's row was locked FOR NO KEY UPDATE, 190 of 480 such stores
    failed with "deadlock detected")."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import select

    from pacs.index.models import Instance, Patient, Series, Study
    from pacs.synthetic import SeriesSpec, make_series

    empty_database(pg_url)
    services = build_services(Settings(data_dir=tmp_path / "data", index={"url": pg_url, "pool_size": 8}))
    shapes = [(2, 16, False)] * 4 + [(4, 4, True)] * 12  # (series, instances each, interleaved)
    try:
        for r, (n_series, count, interleaved) in enumerate(shapes):
            series = [list(make_series(SeriesSpec(study_key=f"par{r}", series_key=f"s{n}", series_number=n,
                                                  rows=8, columns=8, count=count)))
                      for n in range(1, n_series + 1)]
            data = [d for group in zip(*series) for d in group] if interleaved else [d for s in series for d in s]
            with ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(services.ingest.store, data))  # raises on a deadlock
            assert len(outcomes) == n_series * count
        total = sum(n * count for n, count, _ in shapes)
        with services.db.session() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == total
            assert set(session.scalars(select(Series.num_instances))) == {16, 4}
            assert sorted(session.scalars(select(Study.num_series))) == [2] * 4 + [4] * 12
            assert set(session.scalars(select(Study.num_instances))) == {32, 16}
            assert set(session.scalars(select(Study.modalities_in_study))) == {"CT"}
            patient = session.scalars(select(Patient)).one()
            assert (patient.num_instances, patient.num_series, patient.num_studies) == (total, 56, 16)
    finally:
        services.close()


@pytest.fixture
def services_on_postgres(pg_url, tmp_path):
    """Local packs with the index on an emptied Postgres."""
    empty_database(pg_url)
    services = build_services(Settings(data_dir=tmp_path / "data", index={"url": pg_url}))
    yield services
    services.close()


def test_a_deadlock_is_a_conflict_and_a_store_that_meets_one_is_run_again(services_on_postgres, monkeypatch):
    import threading

    from pacs.errors import IndexConflict
    from pacs.ingest.service import StoreOutcome
    from pacs.synthetic import SeriesSpec, make_series

    services = services_on_postgres
    barrier = threading.Barrier(2)
    errors = []

    def lock(first: int, second: int) -> None:  # two transactions taking two locks in opposite orders
        try:
            with services.db.transaction() as conn:
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({first})")
                barrier.wait(10)
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({second})")
        except Exception as exc:  # noqa: BLE001 - the one Postgres picks as the deadlock's victim
            errors.append(exc)

    threads = [threading.Thread(target=lock, args=pair) for pair in ((901, 902), (902, 901))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], IndexConflict), errors
    assert "deadlock detected" in str(errors[0])

    attempts = []
    store_once = type(services.ingest)._store_once

    def conflicting_once(self, *args):
        attempts.append(1)
        if len(attempts) == 1:
            raise errors[0]
        return store_once(self, *args)

    monkeypatch.setattr(type(services.ingest), "_store_once", conflicting_once)
    data = next(make_series(SeriesSpec(study_key="conflict", series_key="c", rows=8, columns=8, count=1)))
    assert services.ingest.store(data).outcome is StoreOutcome.STORED
    assert len(attempts) == 2


@pytest.mark.parametrize("write_first", [False, True])
def test_on_postgres_the_index_commits_only_after_the_bytes_are_durable(services_on_postgres, monkeypatch,
                                                                         write_first):
    """The statements that commit alone run after the flush, for a new series and a known one."""
    from sqlalchemy import select

    from pacs.index.models import Instance
    from pacs.ingest.service import StoreOutcome
    from tests.unit.test_append_packs import _WatchedFlush, series

    services = services_on_postgres
    watch = _WatchedFlush(services)
    watch.install(monkeypatch)
    outcomes = [services.ingest.store(data, write_first=write_first).outcome for data in series("pg-order", 4)]
    assert outcomes == [StoreOutcome.STORED] * 4
    assert watch.checked == 4
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 4


def test_on_postgres_a_flush_that_fails_indexes_nothing(services_on_postgres, monkeypatch):
    from sqlalchemy import select

    import pacs.ingest.service as service
    from pacs.errors import StorageUnavailable
    from pacs.index.models import Instance, Series
    from tests.unit.test_append_packs import _WatchedFlush, series

    services = services_on_postgres
    sent = series("pg-fails", 2)
    assert services.ingest.store(sent[0]).outcome is service.StoreOutcome.STORED  # the series is known
    monkeypatch.setattr(service.time, "sleep", lambda _s: None)
    watch = _WatchedFlush(services, fail=True)
    watch.durable = 1
    watch.install(monkeypatch)
    with pytest.raises(StorageUnavailable, match="disk gone"):
        services.ingest.store(sent[1])
    assert watch.checked == service.STORE_ATTEMPTS
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalars(select(Series.num_instances)).one() == 1
        # the transactions begun by hand were rolled back before their connections went back to the pool
        assert session.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND state LIKE 'idle in transaction%'")) == 0


def test_on_postgres_a_store_waiting_for_its_flush_holds_up_no_other_store(services_on_postgres, monkeypatch):
    """While one store of a known series waits for its bytes to be durable, its row is in and
    uncommitted, and another store into the same series goes through: the series' counters
    are locked only once the bytes are durable."""
    import threading

    from sqlalchemy import select

    from pacs.index.models import Instance, Series, Study
    from pacs.ingest.service import StoreOutcome
    from pacs.storage.local import LocalAppendFile
    from tests.unit.test_append_packs import series

    services = services_on_postgres
    sent = series("pg-overlap", 3)
    assert services.ingest.store(sent[0]).outcome is StoreOutcome.STORED  # the series is known
    real = LocalAppendFile.start_flush
    held, go = threading.Event(), threading.Event()

    class HeldFlush:
        def __init__(self, file) -> None:
            self.flush = real(file)

        def wait(self) -> None:
            if not held.is_set():  # the first flush after this point waits until told
                held.set()
                assert go.wait(30)
            self.flush.wait()

    monkeypatch.setattr(LocalAppendFile, "start_flush", lambda file: HeldFlush(file))
    first = threading.Thread(target=lambda: services.ingest.store(sent[1]))
    first.start()
    try:
        assert held.wait(30)
        outcomes = []
        second = threading.Thread(target=lambda: outcomes.append(services.ingest.store(sent[2]).outcome))
        second.start()
        second.join(10)
        assert not second.is_alive(), "the second store waited for the first one's flush"
        assert outcomes == [StoreOutcome.STORED]
        with services.db.session() as session:  # the first's row is not visible yet
            assert set(session.scalars(select(Instance.sop_instance_uid))) == {
                read_uid(sent[0]), read_uid(sent[2])}
            assert session.scalars(select(Series.num_instances)).one() == 2
    finally:
        go.set()
        first.join(30)
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 3
        assert session.scalars(select(Series.num_instances)).one() == 3
        assert session.scalars(select(Study.num_instances)).one() == 3


def read_uid(data: bytes) -> str:
    from pydicom import dcmread

    return dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID


def _watch_writes(services, events: list) -> None:
    from sqlalchemy import event

    def seen(conn, _cursor, statement, *_):  # noqa: ANN001
        events.append(" ".join(statement.split()[:2]))

    for engine in (services.db.engine, services.db._autocommit):
        event.listen(engine, "before_cursor_execute", seen)
    objects = services.ingest.objects
    begin_put, put = objects.begin_put, objects.put
    objects.begin_put = lambda *a, **k: events.append("write") or begin_put(*a, **k)
    objects.put = lambda *a, **k: events.append("write") or put(*a, **k)


def test_on_postgres_a_store_written_first_is_indexed_in_two_round_trips_while_its_bytes_flush(
        services_on_postgres):
    from pacs.ingest.service import StoreOutcome
    from tests.unit.test_append_packs import series

    services = services_on_postgres
    sent = series("pg-first", 3)
    services.ingest.store(sent[0])  # the series is known
    events = []
    _watch_writes(services, events)
    assert services.ingest.store(sent[1]).outcome is StoreOutcome.STORED
    assert events == ["SELECT instances.container,", "write", "BEGIN; WITH", "UPDATE series"]
    events.clear()
    assert services.ingest.store(sent[2], write_first=True).outcome is StoreOutcome.STORED
    assert events == ["write", "BEGIN; WITH", "UPDATE series"]  # no look-up: the insert tells


@pytest.mark.parametrize("policy", ["keep-first", "overwrite", "reject"])
def test_on_postgres_a_resend_written_first_is_answered_as_one_looked_up_first(pg_url, tmp_path, policy):
    """The bytes written before the look-up found the UID are the new bytes under the overwrite
    policy (written once), and left unreferenced otherwise; the index is what it would have been."""
    from sqlalchemy import select

    from pacs.errors import DuplicateConflict
    from pacs.index.models import Instance, Series
    from pacs.index.repository import find_location
    from pacs.ingest.service import StoreOutcome
    from tests.unit.test_append_packs import series

    empty_database(pg_url)
    services = build_services(Settings(data_dir=tmp_path / "data", index={"url": pg_url},
                                       storage={"duplicate_policy": policy}))
    try:
        sent = series(f"pg-again-{policy}", 3)
        assert {services.ingest.store(data).outcome for data in sent} == {StoreOutcome.STORED}
        uid = services.ingest.store(sent[1]).sop_instance_uid  # a plain duplicate, looked up first
        with services.db.autocommit() as conn:
            before = find_location(conn, uid)
        events = []
        _watch_writes(services, events)
        same = services.ingest.store(sent[1], write_first=True)
        assert same.outcome is StoreOutcome.DUPLICATE and same.location == before
        changed = sent[1][:-1] + bytes([sent[1][-1] ^ 0xFF])  # the last pixel byte: same UID, other bytes
        if policy == "reject":
            with pytest.raises(DuplicateConflict):
                services.ingest.store(changed, write_first=True)
        else:
            outcome = services.ingest.store(changed, write_first=True)
            assert outcome.outcome is {"keep-first": StoreOutcome.KEPT_EXISTING,
                                       "overwrite": StoreOutcome.OVERWRITTEN}[policy]
        assert events.count("write") == 2  # each re-send written once, before its look-up
        with services.db.autocommit() as conn:
            now = find_location(conn, uid)
        if policy == "overwrite":
            assert now != before and services.objects.get(now) == changed
        else:
            assert now == before
        assert services.objects.get(before) == sent[1]
        with services.db.session() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 3
            assert session.scalars(select(Series.num_instances)).one() == 3
    finally:
        services.close()
