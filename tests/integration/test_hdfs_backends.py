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
