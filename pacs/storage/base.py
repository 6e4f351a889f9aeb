"""The bulk-byte store interface.

A :class:`BlobStore` keeps opaque byte files under slash-separated relative
paths and knows nothing about DICOM (like Orthanc's ``IStorageArea``).  Every
backend gives the same guarantees, checked by one shared test module:

* :meth:`write` creates a new file and returns only once the bytes are durable
  (fsync'ed on the local filesystem; hsync'ed and closed with the configured
  replication on HDFS).  It never overwrites: writing an existing path fails.
* A failed :meth:`write` leaves nothing visible at ``path``.
* :meth:`read` returns exactly the bytes written, whole or as a byte range.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class BlobInfo:
    path: str
    size: int


class BlobStore(abc.ABC):
    """Durable, append-never, overwrite-never byte files addressed by relative path."""

    #: Human-readable description (backend and root), for logs and ``pacs info``.
    description: str = ""

    @abc.abstractmethod
    def write(self, path: str, chunks: Iterable[bytes]) -> int:
        """Create ``path`` from ``chunks``; return the byte count once durable."""

    @abc.abstractmethod
    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes from ``offset`` (to the end when ``length`` is None)."""

    def iter_read(
        self, path: str, offset: int = 0, length: int | None = None, chunk_size: int = 4 << 20
    ) -> Iterator[bytes]:
        """Stream a byte range in chunks of at most ``chunk_size`` bytes."""
        if length is None:
            length = self.size(path) - offset
        end = offset + length
        while offset < end:
            n = min(chunk_size, end - offset)
            yield self.read(path, offset, n)
            offset += n

    @abc.abstractmethod
    def delete(self, path: str) -> bool:
        """Remove ``path``; return False when it did not exist."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def size(self, path: str) -> int: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every file under the folder ``prefix`` (recursively), in no set order."""

    def close(self) -> None:
        """Release connections; the default holds none."""
