"""Blob stores on HDFS, through either of two Python clients.

* :class:`NativeHdfsBlobStore` speaks Hadoop's RPC and data-transfer protocols
  through ``hdfs-native`` (Rust, no JVM).
* :class:`WebHdfsBlobStore` goes through the NameNode's WebHDFS REST API with
  the ``hdfs`` package: every create is two HTTP exchanges (NameNode, then the
  DataNode it redirects to) and the write pipeline runs inside that DataNode.

``docs/storage.md`` has the measurements that chose the default.  Both create
files with the configured replication and block size, never overwrite, and
return from :meth:`write` only after the file is closed (and, for the native
client, hsync'ed first, so every replica in the pipeline fsync'ed the block).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator

from pacs.errors import NotFound, StorageUnavailable
from pacs.storage.base import BlobInfo, BlobStore


def _join(root: str, path: str) -> str:
    if path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"blob path must be relative without '..', got {path!r}")
    return posixpath.join(root, path) if path else root


class NativeHdfsBlobStore(BlobStore):
    def __init__(
        self,
        url: str,
        root: str = "/pacs",
        *,
        replication: int = 3,
        block_size: int = 256 << 20,
        hsync: bool = True,
    ) -> None:
        import hdfs_native  # imported here: the local default must not need it

        self._hdfs_native = hdfs_native
        self.url = url
        self.root = root.rstrip("/") or "/"
        self.replication = replication
        self.block_size = block_size
        self.hsync = hsync
        self.description = f"hdfs-native:{url}{self.root} (replication {replication})"
        try:
            self.client = hdfs_native.Client(url)
            self.client.mkdirs(self.root, create_parent=True)
        except Exception as exc:  # the client raises plain RuntimeError/OSError kinds
            raise StorageUnavailable(f"cannot reach HDFS at {url}: {exc}") from exc

    def _options(self):
        opts = self._hdfs_native.WriteOptions()
        opts.replication = self.replication
        opts.block_size = self.block_size
        opts.overwrite = False
        opts.create_parent = True
        return opts

    def write(self, path: str, chunks: Iterable[bytes]) -> int:
        full = _join(self.root, path)
        written = 0
        try:
            writer = self.client.create(full, self._options())
        except FileExistsError:
            raise
        except Exception as exc:
            if "AlreadyExists" in str(exc) or "already exists" in str(exc):
                raise FileExistsError(full) from exc
            raise StorageUnavailable(f"cannot create {full} on {self.url}: {exc}") from exc
        try:
            for chunk in chunks:
                writer.write(chunk)
                written += len(chunk)
            if self.hsync:
                writer.hsync()
            writer.close()
        except Exception as exc:
            self._abandon(full)
            raise StorageUnavailable(f"write of {full} on {self.url} failed: {exc}") from exc
        return written

    def _abandon(self, full: str) -> None:
        """Remove a file whose write failed, so nothing half-written is visible."""
        try:
            self.client.delete(full)
        except Exception:
            pass  # the landing sweeper removes it later; it is not referenced by the index

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        full = _join(self.root, path)
        try:
            with self.client.read(full) as reader:
                if length is None:
                    length = reader.size() - offset
                data = reader.read_range(offset, length)
        except FileNotFoundError:
            raise NotFound(f"no blob at {full} on {self.url}") from None
        except Exception as exc:
            raise StorageUnavailable(f"cannot read {full} on {self.url}: {exc}") from exc
        if len(data) != length:
            raise StorageUnavailable(
                f"short read of {full}: expected {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    def iter_read(
        self, path: str, offset: int = 0, length: int | None = None, chunk_size: int = 4 << 20
    ) -> Iterator[bytes]:
        full = _join(self.root, path)
        try:
            with self.client.read(full) as reader:
                if length is None:
                    length = reader.size() - offset
                end = offset + length
                while offset < end:
                    n = min(chunk_size, end - offset)
                    yield reader.read_range(offset, n)
                    offset += n
        except FileNotFoundError:
            raise NotFound(f"no blob at {full} on {self.url}") from None

    def delete(self, path: str) -> bool:
        full = _join(self.root, path)
        try:
            return bool(self.client.delete(full))
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise StorageUnavailable(f"cannot delete {full} on {self.url}: {exc}") from exc

    def exists(self, path: str) -> bool:
        try:
            self.client.get_file_info(_join(self.root, path))
        except FileNotFoundError:
            return False
        return True

    def size(self, path: str) -> int:
        full = _join(self.root, path)
        try:
            return self.client.get_file_info(full).length
        except FileNotFoundError:
            raise NotFound(f"no blob at {full} on {self.url}") from None

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        base = _join(self.root, prefix)
        strip = len(self.root.rstrip("/")) + 1
        try:
            statuses = list(self.client.list_status(base, recursive=True))
        except FileNotFoundError:
            return
        for status in statuses:
            if status.isdir:
                continue
            yield BlobInfo(status.path[strip:], status.length)


class WebHdfsBlobStore(BlobStore):
    def __init__(
        self,
        url: str,
        root: str = "/pacs",
        *,
        user: str = "pacs",
        replication: int = 3,
        block_size: int = 256 << 20,
    ) -> None:
        import hdfs  # imported here: the local default must not need it

        self._hdfs = hdfs
        self.url = url
        self.root = root.rstrip("/") or "/"
        self.replication = replication
        self.block_size = block_size
        self.description = f"webhdfs:{url}{self.root} (replication {replication})"
        self.client = hdfs.InsecureClient(url, user=user)
        try:
            self.client.makedirs(self.root)
        except Exception as exc:
            raise StorageUnavailable(f"cannot reach WebHDFS at {url}: {exc}") from exc

    def write(self, path: str, chunks: Iterable[bytes]) -> int:
        full = _join(self.root, path)
        counted = _Counter(chunks)
        try:
            self.client.write(
                full,
                data=iter(counted),
                overwrite=False,
                replication=self.replication,
                blocksize=self.block_size,
            )
        except self._hdfs.util.HdfsError as exc:
            if "FileAlreadyExists" in str(exc) or "already exists" in str(exc):
                raise FileExistsError(full) from exc
            self._abandon(full)
            raise StorageUnavailable(f"write of {full} via {self.url} failed: {exc}") from exc
        except Exception as exc:
            self._abandon(full)
            raise StorageUnavailable(f"write of {full} via {self.url} failed: {exc}") from exc
        return counted.count

    def _abandon(self, full: str) -> None:
        try:
            self.client.delete(full)
        except Exception:
            pass

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        full = _join(self.root, path)
        try:
            with self.client.read(full, offset=offset, length=length) as reader:
                data = reader.read()
        except self._hdfs.util.HdfsError as exc:
            if "FileNotFound" in str(exc) or "does not exist" in str(exc):
                raise NotFound(f"no blob at {full} via {self.url}") from None
            raise StorageUnavailable(f"cannot read {full} via {self.url}: {exc}") from exc
        except Exception as exc:
            raise StorageUnavailable(f"cannot read {full} via {self.url}: {exc}") from exc
        if length is not None and len(data) != length:
            raise StorageUnavailable(
                f"short read of {full}: expected {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    def delete(self, path: str) -> bool:
        return bool(self.client.delete(_join(self.root, path)))

    def exists(self, path: str) -> bool:
        return self.client.status(_join(self.root, path), strict=False) is not None

    def size(self, path: str) -> int:
        status = self.client.status(_join(self.root, path), strict=False)
        if status is None:
            raise NotFound(f"no blob at {path!r} via {self.url}")
        return int(status["length"])

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        base = _join(self.root, prefix)
        if self.client.status(base, strict=False) is None:
            return
        strip = len(self.root.rstrip("/")) + 1
        for dirpath, _dirs, files in self.client.walk(base, status=True):
            folder = dirpath[0] if isinstance(dirpath, tuple) else dirpath
            for name, status in files:
                yield BlobInfo(posixpath.join(folder, name)[strip:], int(status["length"]))


class _Counter:
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.count += len(chunk)
            yield chunk
