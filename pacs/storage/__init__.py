"""Bulk storage: the blob-store interface, its backends, and object packing."""

from __future__ import annotations

from pacs.settings import HdfsClient, Settings, StorageBackend
from pacs.storage.base import BlobInfo, BlobStore
from pacs.storage.objects import Location, ObjectStore


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings choose."""
    storage = settings.storage
    if storage.backend is StorageBackend.LOCAL:
        from pacs.storage.local import LocalBlobStore

        return LocalBlobStore(settings.local_store_root)
    if storage.hdfs_client is HdfsClient.NATIVE:
        from pacs.storage.hdfs import NativeHdfsBlobStore

        return NativeHdfsBlobStore(
            storage.hdfs_url,
            storage.hdfs_root,
            replication=storage.replication,
            block_size=storage.block_size_mb << 20,
            timeout_s=storage.hdfs_timeout_s,
            hsync=storage.hdfs_hsync,
            pack_writer=storage.hdfs_pack_writer,
            webhdfs_url=storage.webhdfs_url,
            webhdfs_user=storage.hdfs_user,
        )
    from pacs.storage.hdfs import WebHdfsBlobStore

    return WebHdfsBlobStore(
        storage.webhdfs_url,
        storage.hdfs_root,
        user=storage.hdfs_user,
        replication=storage.replication,
        block_size=storage.block_size_mb << 20,
    )


__all__ = ["BlobInfo", "BlobStore", "Location", "ObjectStore", "open_blob_store"]
