"""The shared storage and ingest contracts against the real HDFS and Postgres."""

from __future__ import annotations

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
