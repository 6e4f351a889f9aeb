"""The shared storage and ingest contracts against the real HDFS and Postgres."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time

import pytest
import xxhash

from pacs.errors import StorageUnavailable
from pacs.storage import datanode
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


def test_a_pack_still_being_written_is_read_from_its_datanodes_in_few_requests(hdfs_root, monkeypatch):
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL)
    objects = ObjectStore(blobs)
    pack = blobs.open_append("packs/open.pack")
    records = [os.urandom(300_000) for _ in range(40)]  # 12 MB, all in the block under construction
    locations = [Location("packs/open.pack", pack.append([r]), len(r), hashlib.sha256(r).hexdigest())
                 for r in records]
    lists, reads = [], []
    monkeypatch.setattr(datanode, "fetch_block_list", counted(datanode.fetch_block_list, lists))
    monkeypatch.setattr(datanode, "read_block", counted(datanode.read_block, reads))
    monkeypatch.setattr(WebHdfsBlobStore, "read", refuse)
    try:
        assert list(objects.get_many(locations)) == records
        assert (len(lists), len(reads)) == (1, 2)  # one block list; 8 MiB spans, not one read per record
        later = os.urandom(1000)  # appended after the block list was fetched
        assert blobs.read("packs/open.pack", pack.append([later]), 1000) == later
        # the block being written is asked of its DataNodes, not of the NameNode again
        assert (len(lists), len(reads)) == (1, 3)
        assert blobs.read("packs/open.pack", 1_234_567, 89) == b"".join(records)[1_234_567:1_234_656]
    finally:
        pack.close()


def test_spans_of_a_sealed_pack_are_read_from_its_datanodes_and_a_bad_read_is_read_again(hdfs_root, monkeypatch,
                                                                                         caplog):
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL)
    objects = ObjectStore(blobs)
    pack = blobs.open_append("packs/sealed.pack")
    records = [os.urandom(100_000) for _ in range(30)]
    locations = [Location("packs/sealed.pack", pack.append([r]), len(r), hashlib.sha256(r).hexdigest(),
                          xxhash.xxh3_64_hexdigest(r)) for r in records]
    pack.close()
    reads = []
    monkeypatch.setattr(datanode, "read_block", counted(datanode.read_block, reads))
    assert list(objects.get_many(locations)) == records
    assert len(reads) == 1  # one span, from a DataNode
    assert objects.get(locations[3]) == records[3]
    assert len(reads) == 2

    read_block = datanode.read_block

    def one_bit_flipped(address, block, offset, out, **kwargs):  # a replica gone bad on disk
        read_block(address, block, offset, out, **kwargs)
        out[len(out) // 2] ^= 0x10

    monkeypatch.setattr(datanode, "read_block", one_bit_flipped)
    assert list(objects.get_many(locations)) == records  # the object hit is read again through hdfs-native
    assert objects.get(locations[15]) == records[15]
    assert caplog.text.count("a read did not match its checksum") == 2


def counted(function, calls: list):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return wrapper


def refuse(*args, **kwargs):
    raise AssertionError("read through WebHDFS")


def test_an_open_pack_is_read_across_its_completed_blocks_and_the_one_being_written(hdfs_root, monkeypatch):
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, block_size=1 << 20, webhdfs_url=WEBHDFS_URL)
    pack = blobs.open_append("packs/blocks.pack")
    data = os.urandom(3_500_000)  # three full blocks of 1 MiB, a fourth being written
    for start in range(0, len(data), 700_000):
        pack.append([data[start:start + 700_000]])
    monkeypatch.setattr(WebHdfsBlobStore, "read", refuse)
    try:
        assert blobs.read("packs/blocks.pack", 0, len(data)) == data
        for offset, length in ((1_048_000, 1_000), (3_145_000, 300_000), (2_097_152, 1_048_576), (5, 3_400_000)):
            assert blobs.read("packs/blocks.pack", offset, length) == data[offset:offset + length]
        chunks = list(blobs.iter_read("packs/blocks.pack", 5, 3_400_000, chunk_size=1_000_000))
        assert [len(c) for c in chunks] == [1_000_000] * 3 + [400_000]  # streamed, not held whole
        assert b"".join(chunks) == data[5:3_400_005]
        with pytest.raises(StorageUnavailable, match="past|available"):
            datanode.DataNodeReader(WEBHDFS_URL, timeout_s=10).read(f"{hdfs_root}/packs/blocks.pack", len(data), 10)
    finally:
        pack.close()
    # sealed: every block complete, read the same way (the unverified path a retrieve takes)
    reads = []
    monkeypatch.setattr(datanode, "read_block", counted(datanode.read_block, reads))
    for offset, length in ((0, len(data)), (1_048_000, 2_000_000), (3_145_728, 354_272)):
        assert blobs.read_unverified("packs/blocks.pack", offset, length) == data[offset:offset + length]
    assert len(reads) == 4 + 3 + 1  # one READ_BLOCK per block touched


def test_an_open_pack_is_read_from_the_next_datanode_when_one_does_not_answer(hdfs_root, monkeypatch):
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL)
    pack = blobs.open_append("packs/dead.pack")
    record = os.urandom(200_000)
    pack.append([record])
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()  # nothing listens there once closed
    fetch = datanode.fetch_block_list

    def dead_first(*args):
        blocks = fetch(*args)
        return dataclasses.replace(blocks, blocks=tuple(
            dataclasses.replace(b, datanodes=(dead, *b.datanodes)) for b in blocks.blocks))

    monkeypatch.setattr(datanode, "fetch_block_list", dead_first)
    monkeypatch.setattr(WebHdfsBlobStore, "read", refuse)
    try:
        assert blobs.read("packs/dead.pack", 0, len(record)) == record
    finally:
        pack.close()


def test_a_datanode_that_hangs_costs_one_timeout_not_one_per_read(hdfs_root, monkeypatch):
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL)
    pack = blobs.open_append("packs/hung.pack")
    records = [os.urandom(100_000) for _ in range(4)]
    offsets = [pack.append([r]) for r in records]
    reader = datanode.DataNodeReader(WEBHDFS_URL, timeout_s=1)
    fetch = datanode.fetch_block_list
    try:
        with socket.create_server(("127.0.0.1", 0)) as hung:  # the kernel accepts; nothing ever answers
            def hung_first(*args):
                blocks = fetch(*args)
                return dataclasses.replace(blocks, blocks=tuple(
                    dataclasses.replace(b, datanodes=(hung.getsockname(), *b.datanodes)) for b in blocks.blocks))

            monkeypatch.setattr(datanode, "fetch_block_list", hung_first)
            started = time.monotonic()
            assert reader.read(f"{hdfs_root}/packs/hung.pack", offsets[0], len(records[0])) == records[0]
            first_s = time.monotonic() - started
            started = time.monotonic()
            for offset, record in zip(offsets[1:], records[1:]):
                assert reader.read(f"{hdfs_root}/packs/hung.pack", offset, len(record)) == record
            rest_s = time.monotonic() - started
    finally:
        pack.close()
    assert first_s >= 0.9  # waited for the hung DataNode once
    assert rest_s < 0.9  # then asked the others first


def test_packs_are_read_through_the_clients_where_datanodes_will_not_serve_this_one(hdfs_root, monkeypatch,
                                                                                   caplog):
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL)
    pack = blobs.open_append("packs/refused.pack")
    record = os.urandom(100_000)
    pack.append([record])
    attempts = []

    def refused(*args, **kwargs):
        attempts.append(args)
        raise datanode.DataNodeReadError("the DataNode asks for SASL")

    monkeypatch.setattr(datanode, "read_block", refused)
    try:
        for _ in range(5):
            assert blobs.read("packs/refused.pack", 0, len(record)) == record
        tried = len(attempts)
        assert tried == 3 * 2 * 3  # three reads tried every DataNode, with the list fetched twice
        assert "reading through hdfs-native and WebHDFS from now on" in caplog.text
    finally:
        pack.close()


def test_appends_are_handed_over_whole_or_chunk_by_chunk(hdfs_root, monkeypatch):
    """hdfs-native's writer: a record up to GATHER_BYTES is written and hsync'ed in one call the caller
    does not wait for; a longer one chunk by chunk.  Both read back where their offsets say, after the flush."""
    import pacs.storage.hdfs as hdfs

    monkeypatch.setattr(hdfs, "GATHER_BYTES", 1 << 20)
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL, pack_writer="native")
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
    """hdfs-native's writer: the write failing on the loop surfaces at the flush's wait, and nothing more
    is appended."""
    from pacs.errors import StorageUnavailable

    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, pack_writer="native")
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
