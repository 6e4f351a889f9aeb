from __future__ import annotations

import pytest

from pacs.storage.local import LocalBlobStore
from tests.contracts import BlobStoreContract, IngestContract


class TestLocalBlobStore(BlobStoreContract):
    @pytest.fixture
    def blobs(self, tmp_path):
        return LocalBlobStore(tmp_path / "store")


class TestEmbeddedIngest(IngestContract):
    @pytest.fixture
    def services(self, embedded):
        return embedded


def test_local_write_is_atomic_on_crash_leftovers(tmp_path):
    store = LocalBlobStore(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".x.bin.deadbeef.tmp").write_bytes(b"partial")
    store.write("a/x.bin", [b"whole"])
    assert [i.path for i in store.list("")] == ["a/x.bin"]


def test_small_appends_go_into_zeros_written_ahead_and_closing_cuts_them(tmp_path):
    from pacs.storage.local import ZERO_AHEAD, ZERO_AHEAD_BELOW
    from pacs.storage.objects import RECORD_HEADER, RECORD_MAGIC, read_pack_records

    store = LocalBlobStore(tmp_path)
    pack = store.open_append("packs/p.pack")
    full = tmp_path / "packs/p.pack"
    records = [bytes([i]) * 9000 for i in range(1, 4)]
    for data in records:
        pack.append([RECORD_HEADER.pack(RECORD_MAGIC, len(data), b"\1" * 32), data])
    written = 3 * (RECORD_HEADER.size + 9000)
    assert pack.size == written
    assert full.stat().st_size == RECORD_HEADER.size + 9000 + ZERO_AHEAD  # zeros ahead of the next records
    assert full.read_bytes()[written:] == bytes(ZERO_AHEAD - written + RECORD_HEADER.size + 9000)
    walked = list(read_pack_records(store, "packs/p.pack"))  # the zeros end the walk
    assert [(r.offset, r.length) for r in walked] == [(i * (RECORD_HEADER.size + 9000) + RECORD_HEADER.size, 9000)
                                                      for i in range(3)]
    big = bytes(ZERO_AHEAD_BELOW)
    pack.append([RECORD_HEADER.pack(RECORD_MAGIC, len(big), b"\2" * 32), big])  # into the zeros
    pack.close()
    assert full.stat().st_size == written + RECORD_HEADER.size + len(big)
    assert [r.length for r in read_pack_records(store, "packs/p.pack")] == [9000, 9000, 9000, len(big)]
    large = store.open_append("packs/q.pack")  # large records: no zeros ahead, every byte written once
    for _ in range(2):
        large.append([RECORD_HEADER.pack(RECORD_MAGIC, len(big), b"\2" * 32), big])
        assert (tmp_path / "packs/q.pack").stat().st_size == large.size
    large.close()


def test_a_forked_child_flushes_on_threads_of_its_own(tmp_path):
    import multiprocessing

    store = LocalBlobStore(tmp_path)
    store.open_append("packs/parent.pack").append([b"x" * 100])  # the parent's flush threads exist now

    def child() -> None:
        store.open_append("packs/child.pack").append([b"y" * 100])  # would wait forever on the parent's threads

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(30)
    assert process.exitcode == 0
    assert (tmp_path / "packs/child.pack").read_bytes()[:100] == b"y" * 100
