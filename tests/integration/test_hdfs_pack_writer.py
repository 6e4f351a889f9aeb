"""The archive's own HDFS write pipeline (pacs.storage.hdfswriter) against the real cluster."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request

import pytest

from pacs.devstack import HDFS_URL, WEBHDFS_URL
from pacs.errors import StorageUnavailable
from pacs.storage import hdfswriter
from pacs.storage.hdfs import NativeHdfsBlobStore, WebHdfsBlobStore
from pacs.storage.hdfswriter import PipelineAppendFile
from pacs.storage.namenode import NameNodeClient

pytestmark = [pytest.mark.hdfs]


def store(hdfs_root: str, **options) -> NativeHdfsBlobStore:
    return NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL, **options)


def calls_to_the_namenode(monkeypatch) -> list[str]:
    methods: list[str] = []
    call = NameNodeClient.call

    def recorded(self, method, request):
        methods.append(method)
        return call(self, method, request)

    monkeypatch.setattr(NameNodeClient, "call", recorded)
    return methods


def packets_sent(monkeypatch, which) -> list[int]:
    """The seqnos of the packets the writer sends for which ``which(seqno, flags)`` holds."""
    seqnos: list[int] = []
    header = hdfswriter.packet_header

    def recorded(offset, seqno, data_len, **flags):
        if which(seqno, flags):
            seqnos.append(seqno)
        return header(offset, seqno, data_len, **flags)

    monkeypatch.setattr(hdfswriter, "packet_header", recorded)
    return seqnos


def run_at_once(target, count: int) -> None:
    """``target(n)`` for n in range(count), each on a thread of its own; returns when all are done.
    (A thread that fails leaves its work undone, which the caller's counts catch.)"""
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def under_construction(path: str) -> bool:
    url = f"{WEBHDFS_URL}/webhdfs/v1{path}?op=GET_BLOCK_LOCATIONS&user.name=pacs&offset=0&length=1"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bool(json.load(reply)["LocatedBlocks"]["isUnderConstruction"])


def test_records_of_every_alignment_read_back_while_open_and_once_closed(hdfs_root, monkeypatch):
    """Records that end inside a checksum chunk (sent again with the next packet), records longer
    than a packet and than a block: each is read back from the DataNodes as soon as it is
    acknowledged, and the closed file is the same bytes through Hadoop's own client (WebHDFS
    reads through the DataNode's DFSClient, which checks every chunk's CRC) and hdfs-native."""
    import hdfs_native

    blobs = store(hdfs_root, block_size=1 << 20)
    pack = blobs.open_append("packs/aligned.pack")
    assert isinstance(pack, PipelineAppendFile)
    chunk = hdfswriter.BYTES_PER_CHECKSUM
    sizes = [1, 511, 512, 513, 100, 1023, chunk - 1, chunk, chunk + 1, 2 * chunk - 3000, 700_000, 1 << 20,
             2_500_000, 3, 77_777]
    written = bytearray()
    try:
        for size in sizes:
            record = os.urandom(size)
            start, flush = pack.begin_append([record[: size // 3], record[size // 3:]])
            flush.wait()
            assert start == len(written)
            written += record
            assert blobs.read("packs/aligned.pack", start, size) == record  # open: from its DataNodes
        assert blobs.read("packs/aligned.pack", 0, len(written)) == written
    finally:
        pack.close()
    full = f"{hdfs_root}/packs/aligned.pack"
    assert not under_construction(full)
    client = hdfs_native.Client(HDFS_URL)
    assert client.get_file_info(full).length == len(written) == pack.size
    assert WebHdfsBlobStore(WEBHDFS_URL, hdfs_root).read("packs/aligned.pack") == written
    with client.read(full) as reader:
        assert reader.read() == written


def test_appends_do_not_call_the_namenode(hdfs_root, monkeypatch):
    """create and addBlock open the pack, complete closes it; the appends in between go to the
    DataNodes alone (hdfs-native's hsync calls the NameNode's fsync every time)."""
    methods = calls_to_the_namenode(monkeypatch)
    blobs = store(hdfs_root)
    pack = blobs.open_append("packs/quiet.pack")
    records = [os.urandom(8_600) for _ in range(200)]
    for record in records:
        pack.append([record])
    assert methods == ["create", "addBlock"]
    pack.close()
    assert set(methods[2:]) == {"complete"}
    assert blobs.read("packs/quiet.pack") == b"".join(records)


def test_a_broken_pipeline_fails_the_append_and_the_pack_closes_with_what_was_acknowledged(hdfs_root):
    blobs = store(hdfs_root)
    pack = blobs.open_append("packs/broken.pack")
    records = [os.urandom(50_000 + n) for n in range(5)]
    for record in records:
        pack.append([record])
    pack._pipeline.sock.shutdown(socket.SHUT_RDWR)  # the first DataNode is gone, as far as the writer sees
    with pytest.raises(StorageUnavailable):
        pack.append([b"never acknowledged"])
    with pytest.raises(StorageUnavailable, match="can no longer be appended"):
        pack.append([b"next"])
    pack.close()  # asks the NameNode to recover the lease: it closes the file with what the DataNodes hold
    full = f"{hdfs_root}/packs/broken.pack"
    deadline = time.monotonic() + 60
    while under_construction(full):
        assert time.monotonic() < deadline, "the NameNode did not close the broken pack"
        time.sleep(0.5)
    assert blobs.read("packs/broken.pack") == b"".join(records)


def test_an_idle_pipeline_gets_heartbeats_and_the_lease_is_renewed(hdfs_root, monkeypatch):
    monkeypatch.setattr(hdfswriter, "HEARTBEAT_AFTER_S", 0.3)
    monkeypatch.setattr(hdfswriter, "LEASE_RENEW_S", 0.3)
    heartbeats = packets_sent(monkeypatch, lambda seqno, flags: seqno == hdfswriter.HEARTBEAT_SEQNO)
    methods = calls_to_the_namenode(monkeypatch)
    blobs = store(hdfs_root)
    pack = blobs.open_append("packs/idle.pack")
    try:
        first = os.urandom(1000)
        pack.append([first])
        time.sleep(1.5)
        second = os.urandom(1000)
        pack.append([second])  # the heartbeats' acknowledgements are skipped on the way
        assert len(heartbeats) >= 2
        assert "renewLease" in methods
    finally:
        pack.close()
    assert blobs.read("packs/idle.pack") == first + second


def test_a_pack_that_exists_is_not_overwritten(hdfs_root):
    blobs = store(hdfs_root)
    blobs.write("packs/taken.pack", [b"first"])
    with pytest.raises(FileExistsError):
        blobs.open_append("packs/taken.pack")
    assert blobs.read("packs/taken.pack") == b"first"


def test_concurrent_appends_stay_whole_and_share_their_syncs(hdfs_root, monkeypatch):
    """Eight threads append to one pack at once: every record lies whole where its offset says,
    is durable when its flush returns, and records that came while a sync was in flight went
    in the next sync packet together (fewer syncs than records)."""
    syncs = packets_sent(monkeypatch, lambda seqno, flags: flags["sync"] and not flags["last"])
    blobs = store(hdfs_root, block_size=1 << 20)  # the records cross blocks, too
    pack = blobs.open_append("packs/shared.pack")
    placed: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def appender(n: int) -> None:
        for i in range(25):
            record = bytes([n]) * (3_000 + 997 * i) + os.urandom(50)
            start, flush = pack.begin_append([record[:1000], record[1000:]])
            flush.wait()
            # durable means sent and acknowledged, also when another record's packets ended a block
            # and this one's rest went to the next block after that sync
            assert pack._durable >= start + len(record) and pack._sent >= start + len(record)
            assert blobs.read("packs/shared.pack", start, len(record)) == record  # durable: readable now
            with lock:
                placed.append((start, record))

    run_at_once(appender, 8)
    pack.close()
    assert len(placed) == 200
    placed.sort()
    body = blobs.read("packs/shared.pack")
    assert b"".join(record for _, record in placed) == body  # whole, in order, nothing between them
    assert len(syncs) < len(placed)


def test_the_pack_pool_shares_one_pipeline_pack_among_concurrent_stores(hdfs_root):
    from pacs.storage.packs import PackPool

    blobs = store(hdfs_root)
    opened, sealed = [], []
    pool = PackPool(blobs, target_bytes=2_000_000, on_open=opened.append,
                    on_seal=lambda path, size, count: sealed.append((path, size, count)))
    records = {}
    barrier = threading.Barrier(4)

    def storer(n: int) -> None:
        barrier.wait(10)
        for i in range(20):
            record = os.urandom(40_000 + n * 100 + i)
            records[pool.append(b"", [record])] = record

    run_at_once(storer, 4)
    pool.close()
    assert len(records) == 80
    assert len(opened) == 2  # 3.2 MB: the first pack sealed at 2 MB, a second for the rest
    assert [count for _, _, count in sealed] and sum(count for _, _, count in sealed) == 80
    for (path, offset), record in records.items():
        assert blobs.read(path, offset, len(record)) == record



def test_a_record_whose_source_fails_is_taken_back_unless_part_of_it_was_sent(hdfs_root):
    """An object shorter than it said (the source raises) fails its store alone: the pack, shared
    by other stores, goes on without it.  Once part of a record is down the pipeline it cannot be
    taken back, and the pack breaks (its stores are retried on a new one)."""
    blobs = store(hdfs_root)
    pack = blobs.open_append("packs/taken-back.pack")

    def failing(*parts):
        yield from parts
        raise ValueError("the object ended 10 bytes early")

    first, second = os.urandom(5_000), os.urandom(7_000)
    pack.append([first])
    with pytest.raises(ValueError, match="ended 10 bytes early"):
        pack.begin_append(failing(b"h" * 48, os.urandom(900)))
    assert pack.size == len(first)
    assert pack.append([second]) == len(first)
    with pytest.raises(StorageUnavailable, match="half-sent"):
        pack.begin_append(failing(os.urandom(3 << 20)))  # 3 MiB: packets went out before the failure
    with pytest.raises(StorageUnavailable, match="can no longer be appended"):
        pack.append([b"next"])
    pack.close()
    full = f"{hdfs_root}/packs/taken-back.pack"
    deadline = time.monotonic() + 60
    while under_construction(full):
        assert time.monotonic() < deadline, "the NameNode did not close the broken pack"
        time.sleep(0.5)
    assert blobs.read("packs/taken-back.pack", 0, len(first) + len(second)) == first + second


def test_the_pack_pool_keeps_a_shared_pack_after_a_store_whose_source_failed(hdfs_root):
    from pacs.storage.packs import PackPool

    blobs = store(hdfs_root)
    opened = []
    pool = PackPool(blobs, target_bytes=1 << 30, on_open=opened.append)

    def failing():
        yield os.urandom(1000)
        raise ValueError("unreadable")

    try:
        first = pool.append(b"", [b"a" * 2000])
        with pytest.raises(ValueError):
            pool.begin_append(b"", failing())
        second = pool.append(b"", [b"b" * 2000])
        assert len(opened) == 1 and second == (first[0], first[1] + 2000)
    finally:
        pool.close()
    assert blobs.read(first[0]) == b"a" * 2000 + b"b" * 2000
