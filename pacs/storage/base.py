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


class Flush(abc.ABC):
    """A flush of an :class:`AppendFile` under way; :meth:`wait` returns once it is durable."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until the flushed bytes are durable; raise ``StorageUnavailable`` if they cannot be."""


class Flushed(Flush):
    """A flush that completed before it was handed out."""

    def wait(self) -> None:
        return None


FLUSHED = Flushed()


class AppendFile(abc.ABC):
    """A new file that grows by appends, each durable when :meth:`append` returns.

    An append is a :meth:`write` followed by a :meth:`start_flush`; a caller
    with other work to do before it needs the bytes durable (indexing them)
    does it between ``start_flush`` and ``Flush.wait``.
    """

    path: str
    #: Whether threads may append at once: each record stays whole, and the
    #: file may make several records durable with one flush.  The pack pool
    #: then gives one open pack to every concurrent store, not one each.
    concurrent: bool = False

    def intact(self) -> bool:
        """After an append failed: whether the file took nothing of it and may take more (else it is retired)."""
        return False

    def append(self, chunks: Iterable[bytes]) -> int:
        """Write ``chunks`` at the end; return the offset of their first byte once they are durable."""
        start, flush = self.begin_append(chunks)
        flush.wait()
        return start

    def begin_append(self, chunks: Iterable[bytes]) -> tuple[int, Flush]:
        """:meth:`write` then :meth:`start_flush`: (offset of the first byte, the flush under way).

        A file whose writes are calls to another thread may do both in one
        call and return before the bytes are written; the flush's ``wait``
        then also reports a failed write.
        """
        start = self.write(chunks)
        return start, self.start_flush()

    @abc.abstractmethod
    def write(self, chunks: Iterable[bytes]) -> int:
        """Write ``chunks`` at the end and return the offset of their first byte; not yet durable."""

    @abc.abstractmethod
    def start_flush(self) -> Flush:
        """Start making everything written so far durable.

        A failed write or flush leaves the file unusable for more appends;
        what an earlier flush made durable stays readable.
        """

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Bytes appended so far."""

    @abc.abstractmethod
    def close(self) -> None:
        """Make everything durable and release the file; it is never appended to again."""


class BlobStore(abc.ABC):
    """Durable, append-never, overwrite-never byte files addressed by relative path."""

    #: Human-readable description (backend and root), for logs and ``pacs info``.
    description: str = ""
    #: Objects lying one after the other in a file are read with one range
    #: read of up to this many bytes (:func:`pacs.storage.objects.plan_spans`)
    #: where each read costs a round trip; 0: one read per object.
    span_bytes: int = 0
    #: A retrieve reads this many spans ahead of the one it sends, each on a
    #: thread of its own, where a read waits on the network; 0: each when it
    #: is needed, on the sending thread (a local file: the page cache and the
    #: kernel's own readahead do it, and threads would only take turns at
    #: Python's lock, ~0.15 ms of CPU per CT image).
    read_ahead: int = 0

    @abc.abstractmethod
    def write(self, path: str, chunks: Iterable[bytes]) -> int:
        """Create ``path`` from ``chunks``; return the byte count once durable."""

    @abc.abstractmethod
    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes from ``offset`` (to the end when ``length`` is None)."""

    def read_unverified(self, path: str, offset: int, length: int) -> bytes | bytearray:
        """:meth:`read`'s bytes for a caller that checks them against digests of its own.

        A store may skip its transport checksums here and hand over a
        ``bytearray``; the caller (``ObjectStore.read_span``, which checks
        each object's SHA-256) reads again through :meth:`read` what fails.
        """
        return self.read(path, offset, length)

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

    def open_append(self, path: str) -> AppendFile:
        """Create ``path`` for appending (see :class:`AppendFile`); backends that cannot, refuse."""
        raise NotImplementedError(f"{type(self).__name__} cannot append to files")

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
