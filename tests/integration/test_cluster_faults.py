"""The storage invariants on HDFS (3 DataNodes) + Postgres, with real faults.

(a) a round trip of a few hundred instances, byte-exact, checksums verified;
(b) a DataNode killed during an ingest: every acknowledged instance reads back;
(c) Postgres stopped during an ingest: failures are reported, nothing is half
    indexed, and re-sending after it returns gives no duplicates;
(f) the number of files on HDFS for 1,000 instances stays bounded.

Ingest appends to open packs on HDFS by default; (a) and (b) also run with
objects landing one file each and compacted later (storage.append_packs=false).
(d) and (e) — one row per re-sent instance, malformed input rejected — run
against this stack in test_hdfs_backends.py's TestClusterIngest.
"""

from __future__ import annotations

import hashlib
import time

import pytest
from sqlalchemy import func, select

from pacs.errors import IndexUnavailable, PacsError
from pacs.index.models import Instance, Patient, Series, Study
from pacs.index.repository import find_instance, location_of
from pacs.ingest.service import StoreOutcome
from pacs.services import build_services
from pacs.storage.scrub import scrub
from pacs.synthetic import SeriesSpec, make_series
from tests.integration.conftest import cluster_settings, deploy

pytestmark = [pytest.mark.hdfs, pytest.mark.postgres]


def read_back_all(services, sent: dict[str, bytes]) -> None:
    """Each acknowledged instance read back alone, then all of them a span at a time, as a retrieve reads."""
    locations = []
    with services.db.session() as session:
        for sop_uid, data in sent.items():
            row = find_instance(session, sop_uid)
            assert row is not None, f"acknowledged instance {sop_uid} is not indexed"
            assert services.objects.get(location_of(row)) == data
            assert row.sha256 == hashlib.sha256(data).hexdigest()
            locations.append(location_of(row))
    assert list(services.objects.get_many(locations)) == list(sent.values())


@pytest.fixture(params=["append", "landing"])
def each_write_path(request, tmp_path, hdfs_root, pg_url):
    """Services on HDFS + Postgres, once appending to open packs and once landing files."""
    services = build_services(cluster_settings(tmp_path, hdfs_root, pg_url, append_packs=request.param == "append"))
    yield services
    services.close()


def test_round_trip_of_300_instances(each_write_path):
    cluster = each_write_path
    spec = SeriesSpec(study_key="a", series_key="a1", rows=256, columns=256, count=300)
    sent = {}
    for data in make_series(spec):
        result = cluster.ingest.store(data, source_ae="SCANNER")
        assert result.outcome is StoreOutcome.STORED
        sent[result.sop_instance_uid] = data
    read_back_all(cluster, sent)  # from the open pack (from its DataNodes), or from the landing area
    if cluster.objects.packs is not None:
        cluster.objects.packs.close()  # sealed: now hdfs-native reads it
    cluster.compactor.wait()
    cluster.compactor.compact(force=True)
    read_back_all(cluster, sent)  # from closed packs
    report = scrub(cluster.db, cluster.objects)
    assert (report.checked, report.problems) == (300, [])


def test_datanode_killed_during_ingest_loses_nothing_acknowledged(each_write_path):
    cluster = each_write_path
    spec = SeriesSpec(study_key="b", series_key="b1", rows=256, columns=256, count=200)
    acknowledged: dict[str, bytes] = {}
    failed = []
    try:
        for i, data in enumerate(make_series(spec)):
            if i == 60:
                deploy("hdfs.sh", "stop-datanode", "2", "--kill")
            try:
                result = cluster.ingest.store(data)
            except PacsError as exc:  # reported, not acknowledged: allowed
                failed.append(str(exc))
                continue
            acknowledged[result.sop_instance_uid] = data
        assert len(acknowledged) >= 150, f"too many failures with one DataNode down: {failed[:3]}"
        read_back_all(cluster, acknowledged)
        if cluster.objects.packs is not None:
            cluster.objects.packs.close()
            read_back_all(cluster, acknowledged)
        cluster.compactor.wait()
        cluster.compactor.compact(force=True)
        read_back_all(cluster, acknowledged)
    finally:
        deploy("hdfs.sh", "start-datanode", "2")


def test_postgres_stopped_during_ingest(cluster):
    spec = SeriesSpec(study_key="c", series_key="c1", rows=128, columns=128, count=200)
    sent = list(make_series(spec))
    acknowledged, failures = [], 0
    try:
        for i, data in enumerate(sent):
            if i == 50:
                deploy("postgres.sh", "stop")
            if i == 120:
                deploy("postgres.sh", "start")
            started = time.monotonic()
            try:
                acknowledged.append(cluster.ingest.store(data).sop_instance_uid)
            except IndexUnavailable:
                failures += 1
                assert time.monotonic() - started < 30, "a store with the index down must fail promptly"
    finally:
        deploy("postgres.sh", "start")
    assert failures >= 60
    with cluster.db.session() as session:
        indexed = set(session.scalars(select(Instance.sop_instance_uid)))
        assert indexed == set(acknowledged)  # nothing half-indexed, nothing acknowledged lost
        # no orphan parents or miscounted series
        series = session.scalars(select(Series)).one()
        assert series.num_instances == len(acknowledged)
    # the failed stores left no bytes behind (only packs and indexed landing files)
    with cluster.db.session() as session:
        referenced = set(session.scalars(select(Instance.container)))
    stored = {i.path for i in cluster.objects.blobs.list("landing")}
    assert stored <= referenced
    # a scanner re-sending everything gets no duplicates
    outcomes = [cluster.ingest.store(data).outcome for data in sent]
    assert outcomes.count(StoreOutcome.DUPLICATE) == len(acknowledged)
    assert outcomes.count(StoreOutcome.STORED) == len(sent) - len(acknowledged)
    with cluster.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == len(sent)
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        assert session.scalar(select(func.count()).select_from(Patient)) == 1
        assert session.scalars(select(Series)).one().num_instances == len(sent)


def test_an_idle_pooled_connection_is_replaced_after_postgres_restarts(pg_url):
    from pacs.index.database import PING_IDLE_S, Database

    db = Database(pg_url, pool_size=2)
    try:
        with db.transaction() as conn:
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        deploy("postgres.sh", "stop")
        deploy("postgres.sh", "start")
        time.sleep(PING_IDLE_S + 0.2)
        # the pooled connection is dead; its ping fails and a new one serves the transaction
        with db.transaction() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != backend
    finally:
        deploy("postgres.sh", "start")
        db.dispose()


def test_files_on_hdfs_for_1000_instances_stay_bounded(tmp_path, hdfs_root, pg_url):
    # 1,000 x 128 KiB with 32 MiB packs: the guaranteed bound at rest is one
    # pack per 32 MiB plus one partial pack per compaction run.
    settings = cluster_settings(tmp_path, hdfs_root, pg_url, pack_target_mb=32, landing_max_files=300,
                                append_packs=False)
    services = build_services(settings)
    spec = SeriesSpec(study_key="f", series_key="f1", rows=256, columns=256, count=1000)
    total, peak_landing = 0, 0
    for i, data in enumerate(make_series(spec)):
        services.ingest.store(data)
        total += len(data)
        if i % 50 == 0:
            peak_landing = max(peak_landing, sum(1 for _ in services.objects.blobs.list("landing")))
    services.compactor.wait()
    services.compactor.compact(force=True)
    files = list(services.objects.blobs.list(""))
    services.close()
    assert peak_landing <= 300
    runs = total // (32 << 20) + 2
    assert len(files) <= runs, [f.path for f in files]
    assert all(f.path.startswith("packs/") for f in files)
    print(f"1,000 instances ({total / 1e6:.0f} MB): {len(files)} files on HDFS, peak landing {peak_landing}")


def test_appending_1000_instances_leaves_one_file_per_pack(tmp_path, hdfs_root, pg_url):
    settings = cluster_settings(tmp_path, hdfs_root, pg_url, pack_target_mb=32)
    services = build_services(settings)
    spec = SeriesSpec(study_key="g", series_key="g1", rows=256, columns=256, count=1000)
    sent, total = {}, 0
    for data in make_series(spec):
        sent[services.ingest.store(data).sop_instance_uid] = data
        total += len(data)
    assert not list(services.objects.blobs.list("landing"))
    services.close()  # seals the last pack
    files = list(services.objects.blobs.list(""))
    assert all(f.path.startswith("packs/") for f in files)
    assert len(files) <= total // (32 << 20) + 1, [f.path for f in files]
    services = build_services(settings)
    try:
        read_back_all(services, sent)
    finally:
        services.close()
    print(f"1,000 instances ({total / 1e6:.0f} MB) appended: {len(files)} files on HDFS")
