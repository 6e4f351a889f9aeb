"""The shared storage and ingest contracts against the real HDFS and Postgres."""

from __future__ import annotations

import os

import pytest

from pacs.storage.hdfs import NativeHdfsBlobStore, WebHdfsBlobStore
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


def test_a_pack_still_being_written_is_read_ahead_in_few_requests(hdfs_root, monkeypatch):
    blobs = NativeHdfsBlobStore(HDFS_URL, hdfs_root, replication=3, webhdfs_url=WEBHDFS_URL)
    pack = blobs.open_append("packs/open.pack")
    records = [os.urandom(300_000) for _ in range(40)]  # 12 MB, all in the block under construction
    offsets = [pack.append([r]) for r in records]
    requests = []
    read_available = WebHdfsBlobStore.read_available
    monkeypatch.setattr(WebHdfsBlobStore, "read_available",
                        lambda self, *args: requests.append(args) or read_available(self, *args))
    try:
        assert [blobs.read("packs/open.pack", o, len(r)) for o, r in zip(offsets, records)] == records
        assert len(requests) == 2  # 8 MB at a time, not one request per record
        later = os.urandom(1000)  # appended after the last read-ahead, which ended before it
        assert blobs.read("packs/open.pack", pack.append([later]), 1000) == later
        assert len(requests) == 3
    finally:
        pack.close()
