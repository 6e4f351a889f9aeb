"""Ingest straight into append-only packs (the embedded default): files, crash safety, concurrency."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from dataclasses import replace

import pytest
from sqlalchemy import func, select

from pacs.errors import ChecksumMismatch, StorageUnavailable
from pacs.index.models import Container, ContainerState, Instance
from pacs.index.repository import location_of
from pacs.ingest.service import CHUNK, StoreOutcome
from pacs.services import build_services
from pacs.settings import Settings
from pacs.storage.objects import RECORD_HEADER, read_pack_records
from pacs.storage.scrub import scrub
from pacs.synthetic import SeriesSpec, make_series


def files_under(services) -> list[str]:
    return sorted(i.path for i in services.objects.blobs.list(""))


def series(key: str, count: int, size: int = 32) -> list[bytes]:
    return list(make_series(SeriesSpec(study_key=key, series_key=f"{key}-1", rows=size, columns=size, count=count)))


def test_objects_go_into_one_pack_written_once(tmp_path):
    services = build_services(Settings(data_dir=tmp_path / "data"))
    sent = series("once", 200)
    results = [services.ingest.store(data) for data in sent]
    assert {r.outcome for r in results} == {StoreOutcome.STORED}
    files = files_under(services)
    assert len(files) == 1 and files[0].startswith("packs/")
    with services.db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert all(row.packed and row.container == files[0] for row in rows)
        assert [services.objects.get(location_of(row)) for row in rows] == sent
        # the pack describes itself: its records are exactly the indexed locations
        assert list(read_pack_records(services.objects.blobs, files[0])) == [
            replace(location_of(row), xxh3=None) for row in rows]  # the headers hold SHA-256s, the index both
        assert session.scalars(select(Container.state)).all() == [ContainerState.OPEN]
    services.close()
    with services.db.session() as session:
        container = session.scalars(select(Container)).one()
        assert container.state is ContainerState.SEALED and container.object_count == 200
        assert container.size_bytes == sum(len(d) + RECORD_HEADER.size for d in sent)


def test_a_full_pack_is_sealed_and_a_new_one_opened(tmp_path):
    services = build_services(Settings(data_dir=tmp_path / "data", storage={"pack_target_mb": 1}))
    sent = series("rotate", 60, size=128)  # ~33 kB each, ~2 MB in all
    for data in sent:
        services.ingest.store(data)
    with services.db.session() as session:
        states = session.scalars(select(Container.state).order_by(Container.id)).all()
        assert states[:-1] == [ContainerState.SEALED] * (len(states) - 1) and len(states) >= 2
        sizes = session.scalars(select(Container.size_bytes).where(Container.state == ContainerState.SEALED)).all()
        assert all(size >= 1 << 20 for size in sizes)
        rows = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert [services.objects.get(location_of(row)) for row in rows] == sent
    services.close()


def test_concurrent_stores_use_separate_packs_and_lose_nothing(tmp_path):
    services = build_services(Settings(data_dir=tmp_path / "data"))
    batches = [series(f"thread{i}", 40) for i in range(4)]
    errors: list[BaseException] = []

    def store(batch: list[bytes]) -> None:
        try:
            for data in batch:
                services.ingest.store(data)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(batch,)) for batch in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    packs = files_under(services)
    assert 1 <= len(packs) <= 4
    with services.db.session() as session:
        stored = {row.sop_instance_uid: services.objects.get(location_of(row)) for row in session.scalars(select(Instance))}
    assert len(stored) == 160
    assert sorted(stored.values()) == sorted(data for batch in batches for data in batch)
    # every pack walks cleanly from the first record to the last
    assert sum(len(list(read_pack_records(services.objects.blobs, p))) for p in packs) == 160
    services.close()


def test_a_torn_last_record_is_ignored_and_the_indexed_objects_verify(tmp_path):
    services = build_services(Settings(data_dir=tmp_path / "data"))
    for data in series("torn", 5):
        services.ingest.store(data)
    pack = files_under(services)[0]
    full = services.settings.local_store_root / pack
    with open(full, "ab") as f:  # what a crash in the middle of an append leaves
        f.write(RECORD_HEADER.pack(b"PACSREC1", 10_000, b"\0" * 32) + b"partial")
    assert len(list(read_pack_records(services.objects.blobs, pack))) == 5
    report = scrub(services.db, services.objects)
    assert report.checked == 5 and not report.problems
    services.close()


class _Rewritten(io.BytesIO):
    """A source file that another program rewrites while it is being stored."""

    name = "rewritten.dcm"

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.passes = 0

    def read(self, size: int = -1) -> bytes:
        chunk = super().read(size)
        if size == CHUNK and self.tell() == len(chunk):  # the first chunk of a pass over the whole object
            self.passes += 1
            if self.passes == 2:  # hashed once already; now being written
                chunk = bytes(b ^ 0xFF for b in chunk[:16]) + chunk[16:]
        return chunk


def test_a_source_that_changes_while_stored_is_refused_and_nothing_is_indexed(tmp_path):
    services = build_services(Settings(data_dir=tmp_path / "data"))
    first, changed, last = series("changes", 3)
    services.ingest.store(first)
    with pytest.raises(ChecksumMismatch, match="changed while stored"):
        services.ingest.store(_Rewritten(changed))
    services.ingest.store(last)
    with services.db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert [services.objects.get(location_of(r)) for r in rows] == [first, last]
        assert hashlib.sha256(changed).hexdigest() not in {r.sha256 for r in rows}
    services.close()


def test_append_packs_need_a_backend_that_can_append(tmp_path):
    webhdfs = {"backend": "hdfs", "hdfs_client": "webhdfs"}
    with pytest.raises(ValueError, match="append_packs=true needs a backend that can append"):
        Settings(data_dir=tmp_path / "data", storage={**webhdfs, "append_packs": True})
    assert not Settings(data_dir=tmp_path, storage=webhdfs).storage.uses_append_packs
    assert Settings(data_dir=tmp_path, storage={"backend": "hdfs"}).storage.uses_append_packs  # hdfs-native
    assert Settings(data_dir=tmp_path).storage.uses_append_packs
    assert not Settings(data_dir=tmp_path, storage={"append_packs": False}).storage.uses_append_packs


def test_a_pack_left_idle_is_sealed(tmp_path):
    services = build_services(Settings(data_dir=tmp_path / "data", storage={"pack_idle_seal_s": 0.4}))
    for data in series("idle", 3):
        services.ingest.store(data)
    deadline = time.monotonic() + 10
    states = []
    while time.monotonic() < deadline:
        with services.db.session() as session:
            states = session.scalars(select(Container.state)).all()
        if states == [ContainerState.SEALED]:
            break
        time.sleep(0.1)
    assert states == [ContainerState.SEALED]
    services.ingest.store(series("idle-2", 1)[0])  # the next store opens a new pack
    assert len(files_under(services)) == 2
    services.close()


class _WatchedFlush:
    """Wraps an append file's flushes: checks, when one is awaited, that the index does not point at it yet."""

    def __init__(self, services, fail: bool = False) -> None:
        self.services, self.fail = services, fail
        self.checked = self.durable = 0

    def install(self, monkeypatch) -> None:
        from pacs.storage.local import LocalAppendFile

        real = LocalAppendFile.start_flush
        watch = self

        class Flush:
            def __init__(self, file) -> None:
                self.file = file

            def wait(self) -> None:
                # another connection sees no committed row for what this flush makes durable
                with watch.services.db.session() as session:
                    assert session.scalar(select(func.count()).select_from(Instance)) == watch.durable
                watch.checked += 1
                if watch.fail:
                    raise StorageUnavailable("disk gone")
                real(self.file).wait()
                watch.durable += 1

        monkeypatch.setattr(LocalAppendFile, "start_flush", lambda file: Flush(file))


def test_the_index_commits_only_after_the_bytes_are_durable(tmp_path, monkeypatch):
    services = build_services(Settings(data_dir=tmp_path / "data"))
    watch = _WatchedFlush(services)
    watch.install(monkeypatch)
    sent = series("order", 5)
    assert [services.ingest.store(data).outcome for data in sent] == [StoreOutcome.STORED] * 5
    assert watch.checked == 5
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 5
    services.close()


def test_a_flush_that_fails_indexes_nothing(tmp_path, monkeypatch):
    import pacs.ingest.service as service

    services = build_services(Settings(data_dir=tmp_path / "data"))
    monkeypatch.setattr(service.time, "sleep", lambda _s: None)  # the retries' back-off
    watch = _WatchedFlush(services, fail=True)
    watch.install(monkeypatch)
    with pytest.raises(StorageUnavailable, match="disk gone"):
        services.ingest.store(series("fails", 1)[0])
    assert watch.checked == service.STORE_ATTEMPTS  # tried again, each time on a new pack
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
        assert session.scalars(select(Container.state)).all() == [ContainerState.SEALED] * service.STORE_ATTEMPTS
    monkeypatch.undo()
    assert services.ingest.store(series("fails", 1)[0]).outcome is StoreOutcome.STORED  # and the next store works
    services.close()


def test_the_index_is_free_to_other_writers_while_a_store_flushes(tmp_path, monkeypatch):
    """SQLite has one writer at a time: a store must not hold its write lock while its bytes are flushed,
    or every other store waits out the flush in SQLite's busy handler (1 ms and longer sleeps)."""
    import sqlite3

    from pacs.storage.local import LocalAppendFile

    services = build_services(Settings(data_dir=tmp_path / "data"))
    database = services.db.engine.url.database
    real = LocalAppendFile.start_flush
    tried = []

    class Flush:
        def __init__(self, file) -> None:
            self.file = file

        def wait(self) -> None:
            other = sqlite3.connect(database, timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # the write lock, now, or "database is locked"
                other.execute("ROLLBACK")
                tried.append("free")
            except sqlite3.OperationalError as exc:
                tried.append(str(exc))
            finally:
                other.close()
            real(self.file).wait()

    monkeypatch.setattr(LocalAppendFile, "start_flush", lambda file: Flush(file))
    assert [services.ingest.store(data).outcome for data in series("unlocked", 3)] == [StoreOutcome.STORED] * 3
    assert tried == ["free"] * 3
    services.close()
