"""The shared storage and ingest contracts against the real HDFS and Postgres."""

from __future__ import annotations

import hashlib
import os

import pytest

from pacs.storage.hdfs import NativeHdfsBlobStore, WebHdfsBlobStore
from pacs.storage.objects import Location, ObjectStore
from tests.contracts import BlobStoreContract, IngestContract
from pacs.devstack import HDFS_URL, WEBHDFS_URL

pytestmark = [pytest.mark.hdfs]


class TestNativeHdfsBlobStore(BlobStoreContract):
    @pytest.fixture
    def blobs(self, hdfs_root):
        return NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3)


class TestWebHdfsBlobStore(BlobStoreContract):
    @pytest.fixture
    def blobs(self, hdfs_root):
        return WebHdfsBlobStore(WEBHDFS_URL, hdfs_root, replication=3)


@pytest.mark.postgres
class TestClusterIngest(IngestContract):
    @pytest.fixture
    def services(self, cluster):
        return cluster


def test_files_are_created_with_the_configured_replication(hdfs_root):
    import hdfs_native

    store = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=2)
    store.write("r/x.bin", [b"abc"])
    assert hdfs_native.Client(HDFS_URL).get_file_info(f"{hdfs_root}/r/x.bin").replication == 2


def test_a_pack_still_being_written_is_read_in_few_requests(hdfs_root, monkeypatch):
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL)
    objects = ObjectStore(blobs)
    pack = blobs.open_append("packs/open.pack")
    records = [os.urandom(300_000) for _ in range(40)]  # 12 MB, all in the block under construction
    locations = [Location("packs/open.pack", pack.append([r]), len(r), hashlib.sha256(r).hexdigest())
                 for r in records]
    requests = []
    read = WebHdfsBlobStore.read
    monkeypatch.setattr(WebHdfsBlobStore, "read", lambda self, *args: requests.append(args) or read(self, *args))
    try:
        assert list(objects.get_many(locations)) == records
        assert len(requests) == 2  # 8 MiB spans, not one request per record
        later = os.urandom(1000)  # appended after the last span read
        assert blobs.read("packs/open.pack", pack.append([later]), 1000) == later
        assert len(requests) == 3
    finally:
        pack.close()


def test_appends_are_handed_over_whole_or_chunk_by_chunk(hdfs_root, monkeypatch):
    """A record up to GATHER_BYTES is written and hsync'ed in one call the caller does not wait for;
    a longer one chunk by chunk.  Both read back where their offsets say, after the flush."""
    import pacs.storage.hdfs as hdfs

    monkeypatch.setattr(hdfs, "GATHER_BYTES", 1 << 20)
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL)
    pack = blobs.open_append("packs/mixed.pack")
    calls = []
    write = type(pack).write
    monkeypatch.setattr(type(pack), "write", lambda self, chunks: calls.append("write") or write(self, chunks))
    records = [[b"h" * 40, os.urandom(300_000)], [os.urandom(700_000), os.urandom(700_000)], [os.urandom(5)]]
    try:
        placed = []
        for chunks in records:
            start, flush = pack.begin_append(iter(chunks))
            flush.wait()
            placed.append((start, b"".join(chunks)))
        assert calls == ["write"]  # only the 1.4 MB record went through write()
        assert pack.size == sum(len(data) for _, data in placed)
        for start, data in placed:
            assert blobs.read("packs/mixed.pack", start, len(data)) == data
    finally:
        pack.close()


def test_a_failed_handed_over_append_breaks_the_pack(hdfs_root):
    """The write failing on the loop surfaces at the flush's wait, and nothing more is appended."""
    from pacs.errors import StorageUnavailable

    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3)
    pack = blobs.open_append("packs/broken.pack")

    class Failing:
        def __init__(self, writer):
            self._writer = writer

        async def write(self, data):
            raise OSError("pipeline gone")

        def __getattr__(self, name):
            return getattr(self._writer, name)

    pack._writer = Failing(pack._writer)
    _, flush = pack.begin_append([b"record"])
    with pytest.raises(StorageUnavailable, match="pipeline gone"):
        flush.wait()
    with pytest.raises(StorageUnavailable, match="can no longer be appended"):
        pack.begin_append([b"next"])
    pack._writer = pack._writer._writer
    pack.close()  # a broken pack is not waited on


def _block_hosts(path: str) -> list[list[str]]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{WEBHDFS_URL}/webhdfs/v1{path}?op=GETFILEBLOCKLOCATIONS", timeout=10) as reply:
        return [block["names"] for block in json.load(reply)["BlockLocations"]["BlockLocation"]]


def test_a_new_pack_gets_every_replica_while_one_datanode_is_busier(hdfs_root):
    """A DataNode holding an open pack serves more transfers than the others; placement must not
    skip it, or the next pack's appends would be acknowledged on two replicas of three."""
    import time

    busy = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=1).open_append("packs/busy.pack")
    packs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3)
    try:
        busy.append([b"x" * 1000])
        time.sleep(2.5)  # the busy node's load reaches the NameNode in a heartbeat (every 1 s)
        for n in range(3):
            pack = packs.open_append(f"packs/{n}.pack")
            try:
                pack.append([b"y" * 1000])
                assert [len(hosts) for hosts in _block_hosts(f"{hdfs_root}/packs/{n}.pack")] == [3]
            finally:
                pack.close()
    finally:
        busy.close()
