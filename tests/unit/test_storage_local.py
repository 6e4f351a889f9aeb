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
