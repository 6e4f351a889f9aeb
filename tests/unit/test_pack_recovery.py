"""Index rows lost in a crash of the machine are made again from the packs (pacs.ingest.recovery)."""

from __future__ import annotations

import hashlib
import io
import pickle
import subprocess
import sys
import textwrap
from dataclasses import replace

import xxhash

from sqlalchemy import select

from pacs.index.models import Container, ContainerState, Instance, Series
from pacs.index.repository import location_of
from pacs.ingest.parse import read_attributes
from pacs.services import build_services
from pacs.settings import Settings
from pacs.storage.local import LocalBlobStore
from pacs.storage.objects import RECORD_HEADER, read_pack_records
from pacs.synthetic import SeriesSpec, make_series


def series(key: str, count: int) -> list[bytes]:
    return list(make_series(SeriesSpec(study_key=key, series_key=f"{key}-1", rows=16, columns=16, count=count)))


def uid_of(data: bytes) -> str:
    return read_attributes(io.BytesIO(data), len(data)).sop_instance_uid


def crash_after(data_dir, indexed: list[bytes], unindexed: list[bytes]) -> str:
    """In a process that then dies: store ``indexed``, append ``unindexed`` without indexing; the pack's path.

    An appended record whose row is missing is what a crash of the machine
    leaves when it takes the last commits of SQLite's unflushed log with it.
    """
    script = textwrap.dedent(
        """
        import hashlib, os, pickle, sys
        from pacs.services import build_services
        from pacs.settings import Settings
        indexed, unindexed = pickle.load(sys.stdin.buffer)
        services = build_services(Settings(data_dir=sys.argv[1]))
        for data in indexed:
            services.ingest.store(data)
        for data in unindexed:
            location = services.objects.put([data], sha256=hashlib.sha256(data).hexdigest(), length=len(data))
        print(location.container, flush=True)
        os._exit(0)  # no close: the pack stays open, its lock goes with the process
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(data_dir)], input=pickle.dumps((indexed, unindexed)),
                          capture_output=True, check=True)
    return done.stdout.decode().strip()


def indexed_uids(services) -> list[str]:
    with services.db.session() as session:
        return list(session.scalars(select(Instance.sop_instance_uid).order_by(Instance.id)))


def test_rows_lost_in_a_crash_are_indexed_again_from_the_pack(tmp_path):
    sent = series("lost", 6)
    pack = crash_after(tmp_path, sent[:4], sent[4:])
    full = Settings(data_dir=tmp_path).local_store_root / pack
    with open(full, "ab") as f:  # and the crash cut an append short
        f.write(RECORD_HEADER.pack(b"PACSREC1", 10_000, b"\0" * 32) + b"partial")

    services = build_services(Settings(data_dir=tmp_path))
    try:
        assert indexed_uids(services) == [uid_of(d) for d in sent]
        with services.db.session() as session:
            assert session.scalars(select(Series.num_instances)).one() == 6
            rows = session.scalars(select(Instance).order_by(Instance.id)).all()
            assert [services.objects.get(location_of(row)) for row in rows] == sent
            container = session.scalars(select(Container).where(Container.path == pack)).one()
            assert container.state is ContainerState.SEALED and container.object_count == 6
        # the recovered rows point at the records where they lie, and the pack ends after the last
        assert [replace(location_of(row), xxh3=None) for row in rows] == list(
            read_pack_records(services.objects.blobs, pack))
        assert [row.xxh3 for row in rows] == [xxhash.xxh3_64_hexdigest(d) for d in sent]
        assert full.stat().st_size == rows[-1].offset + rows[-1].length
        assert [r.outcome.value for r in map(services.ingest.store, sent)] == ["duplicate"] * 6
    finally:
        services.close()
    again = build_services(Settings(data_dir=tmp_path))  # nothing left to do
    try:
        assert indexed_uids(again) == [uid_of(d) for d in sent]
    finally:
        again.close()


def test_a_pack_whose_writer_is_alive_is_left_alone(tmp_path):
    sent = series("alive", 2)
    writer = build_services(Settings(data_dir=tmp_path))
    writer.ingest.store(sent[0])
    data = sent[1]  # written, its row not committed yet: the writer is between the two
    location = writer.objects.put([data], sha256=hashlib.sha256(data).hexdigest(), length=len(data))
    other = build_services(Settings(data_dir=tmp_path))
    try:
        assert indexed_uids(other) == [uid_of(sent[0])]
        with other.db.session() as session:
            state = session.scalars(select(Container.state).where(Container.path == location.container)).one()
        assert state is ContainerState.OPEN
    finally:
        other.close()
        writer.close()


def test_a_record_whose_uid_is_indexed_or_whose_bytes_are_damaged_is_left_alone(tmp_path):
    first, damaged = series("left", 2)
    changed = first[:-1] + bytes([first[-1] ^ 0x01])  # the same UID, a pixel changed
    assert uid_of(changed) == uid_of(first)
    pack = crash_after(tmp_path, [first], [changed, damaged])
    root = Settings(data_dir=tmp_path).local_store_root
    records = list(read_pack_records(LocalBlobStore(root), pack))
    with open(root / pack, "r+b") as f:  # flip a byte of the last record
        f.seek(records[-1].offset + records[-1].length - 1)
        last = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([last[0] ^ 0xFF]))

    services = build_services(Settings(data_dir=tmp_path))
    try:
        assert indexed_uids(services) == [uid_of(first)]
        with services.db.session() as session:
            row = session.scalars(select(Instance)).one()
            assert services.objects.get(location_of(row)) == first
            state = session.scalars(select(Container.state).where(Container.path == pack)).one()
        assert state is ContainerState.SEALED
    finally:
        services.close()


def test_only_ingest_into_local_packs_commits_without_flushing(tmp_path):
    services = build_services(Settings(data_dir=tmp_path / "packs"))
    landing = build_services(Settings(data_dir=tmp_path / "landing", storage={"append_packs": False}))
    try:
        assert services.ingest.flush_commits is False
        assert landing.ingest.flush_commits is True
        with services.db.transaction() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        with services.db.transaction(flush_commit=False) as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    finally:
        services.close()
        landing.close()


def test_a_pack_damaged_in_the_middle_does_not_stop_the_archive_from_starting(tmp_path, caplog):
    sent = series("damaged", 4)
    pack = crash_after(tmp_path, sent[:1], sent[1:])
    root = Settings(data_dir=tmp_path).local_store_root
    records = list(read_pack_records(LocalBlobStore(root), pack))
    with open(root / pack, "r+b") as f:  # the third record's header overwritten
        f.seek(records[2].offset - RECORD_HEADER.size)
        f.write(b"garbage!")
    services = build_services(Settings(data_dir=tmp_path))
    try:
        # what lies before the damage is indexed; the pack stays open for another look
        assert indexed_uids(services) == [uid_of(d) for d in sent[:2]]
        with services.db.session() as session:
            state = session.scalars(select(Container.state).where(Container.path == pack)).one()
        assert state is ContainerState.OPEN
        assert any("left open" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        assert services.ingest.store(sent[3]).outcome.value == "stored"  # and it stores
    finally:
        services.close()
