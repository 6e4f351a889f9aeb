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

Packs that ingest appends to (:meth:`NativeHdfsBlobStore.open_append`) are
written through the archive's own pipeline (:mod:`pacs.storage.hdfswriter`),
or through hdfs-native's writer with ``pack_writer="native"``
(:class:`HdfsAppendFile`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import posixpath
import threading
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Generic, TypeVar

from pacs.errors import NotFound, StorageUnavailable
from pacs.settings import HdfsPackWriter
from pacs.storage.base import AppendFile, BlobInfo, BlobStore, Flush
from pacs.storage.datanode import DataNodeReader, DataNodeReadError
from pacs.storage.hdfswriter import LeaseKeeper, PipelineAppendFile
from pacs.storage.namenode import NameNodeClient

T = TypeVar("T")
log = logging.getLogger(__name__)


def _join(root: str, path: str) -> str:
    if path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"blob path must be relative without '..', got {path!r}")
    return posixpath.join(root, path) if path else root


def _as_bytes(chunk: bytes | memoryview) -> bytes:
    """hdfs-native takes any buffer, but a memoryview measured slower than copying it to bytes first
    (500 CT instances stored: 7.1 s against 4.1 s)."""
    return chunk if isinstance(chunk, bytes) else bytes(chunk)


class _Loop:
    """A private asyncio loop in a daemon thread, shared by all threads of a process.

    hdfs-native's blocking client can wait forever on a pipeline whose
    DataNode died (seen with 0.14.7); its async client can be cancelled, so
    every call goes through here with a deadline.
    """

    _instance: _Loop | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, name="hdfs-native", daemon=True)
        thread.start()
        self._clients: dict[str, object] = {}
        self._clients_lock = threading.Lock()

    def client(self, url: str, connect: Callable[[], T]) -> T:
        """The process's hdfs-native client for ``url``, made by ``connect()`` the first time, then kept.

        Dropping a client blocks in its Rust runtime with the GIL held; a
        runtime thread that needs the GIL at that moment (to hand a result to
        this loop) then waits forever, and so does the process.  A test that
        made and dropped a store hung this way, so a client, once made, lives
        as long as the process.
        """
        with self._clients_lock:
            if url not in self._clients:
                self._clients[url] = connect()
            return self._clients[url]

    @classmethod
    def shared(cls) -> _Loop:
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, awaitable: Awaitable[T], timeout_s: float, what: str) -> T:
        return self.submit(awaitable, timeout_s, what).result()

    def submit(self, awaitable: Awaitable[T], timeout_s: float, what: str) -> _Pending[T]:
        """Start ``awaitable`` on the loop; its :meth:`_Pending.result` waits for it."""

        async def bounded() -> T:
            return await asyncio.wait_for(awaitable, timeout_s)

        return _Pending(asyncio.run_coroutine_threadsafe(bounded(), self.loop), timeout_s, what)


class _Pending(Generic[T]):
    """A call running on the :class:`_Loop`, its failures mapped to :class:`StorageUnavailable`."""

    def __init__(self, future: concurrent.futures.Future, timeout_s: float, what: str) -> None:
        self._future = future
        self._timeout_s = timeout_s
        self._what = what

    def result(self) -> T:
        try:
            return self._future.result()
        except (asyncio.TimeoutError, TimeoutError):
            raise StorageUnavailable(f"{self._what}: no answer from HDFS within {self._timeout_s:g} s") from None
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except Exception:
            raise
        except BaseException as exc:
            # A panic in the Rust client arrives as pyo3's PanicException, a
            # BaseException: turn it into a storage failure the caller handles.
            raise StorageUnavailable(f"{self._what}: HDFS client failed: {exc}") from exc


# Objects next to each other are read together up to this size: each read is
# a NameNode call and a DataNode connection.
SPAN_BYTES = 8 << 20
# Spans a retrieve reads ahead, on as many threads (BlobStore.read_ahead).
READ_AHEAD = 2
# Spans and open packs are read straight from the DataNodes (pacs.storage.datanode)
# unless that failed this many times in a row where the clients then got the same bytes.
DIRECT_MISSES_BEFORE_FALLBACK = 3
# A record up to this size is handed to the client's loop in one piece (HdfsAppendFile.begin_append).
GATHER_BYTES = 8 << 20


def namenode_address(url: str) -> tuple[str, int] | None:
    """(host, port) of an ``hdfs://host:port`` URL; None for a nameservice (HA NameNodes) or a default port,
    which hdfs-native resolves from Hadoop's configuration and the archive's pack writer does not."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "hdfs" or not parsed.hostname or not parsed.port:
        return None
    return parsed.hostname, parsed.port


class NativeHdfsBlobStore(BlobStore):
    span_bytes = SPAN_BYTES
    read_ahead = READ_AHEAD

    def __init__(
        self,
        url: str,
        root: str = "/pacs",
        *,
        replication: int = 3,
        block_size: int = 256 << 20,
        hsync: bool = True,
        pack_writer: HdfsPackWriter | str = HdfsPackWriter.PIPELINE,
        timeout_s: float = 30.0,
        webhdfs_url: str | None = None,
        webhdfs_user: str = "pacs",
    ) -> None:
        import hdfs_native  # imported here: the local default must not need it

        self._hdfs_native = hdfs_native
        self._webhdfs_url = webhdfs_url
        self._webhdfs_user = webhdfs_user
        self._webhdfs: WebHdfsBlobStore | None = None
        self._datanodes = (DataNodeReader(webhdfs_url, webhdfs_user, timeout_s)
                           if webhdfs_url is not None else None)
        self._direct_misses = 0
        self.url = url
        self.root = root.rstrip("/") or "/"
        self.replication = replication
        self.block_size = block_size
        self.hsync = hsync
        self.timeout_s = timeout_s
        self._namenode_address = namenode_address(url)
        self.pack_writer = HdfsPackWriter(pack_writer)
        if self.pack_writer is HdfsPackWriter.PIPELINE and self._namenode_address is None:
            log.info("%s is not an hdfs://host:port: packs are appended through hdfs-native's writer", url)
            self.pack_writer = HdfsPackWriter.NATIVE
        self._namenode: NameNodeClient | None = None
        self._lease_keeper: LeaseKeeper | None = None
        self._writer_lock = threading.Lock()
        self.description = f"hdfs-native:{url}{self.root} (replication {replication})"
        self._loop = _Loop.shared()
        try:
            self.client = self._loop.client(url, lambda: self._run(self._connect(), f"connect to {url}"))
            self._run(self.client.mkdirs(self.root, create_parent=True), f"mkdir {self.root}")
        except StorageUnavailable:
            raise
        except Exception as exc:  # the client raises plain RuntimeError/OSError kinds
            raise StorageUnavailable(f"cannot reach HDFS at {url}: {exc}") from exc

    async def _connect(self):  # noqa: ANN202
        return self._hdfs_native.AsyncClient(self.url)

    def _run(self, awaitable: Awaitable[T], what: str) -> T:
        return self._loop.run(awaitable, self.timeout_s, what)

    def _options(self):  # noqa: ANN202
        opts = self._hdfs_native.WriteOptions()
        opts.replication = self.replication
        opts.block_size = self.block_size
        opts.overwrite = False
        opts.create_parent = True
        return opts

    def _create(self, full: str):  # noqa: ANN202 - hdfs-native's AsyncFileWriter
        """A new file open for writing; FileExistsError if ``full`` exists."""
        try:
            return self._run(self.client.create(full, self._options()), f"create {full}")
        except (FileExistsError, StorageUnavailable):
            raise
        except Exception as exc:
            if "AlreadyExists" in str(exc) or "already exists" in str(exc):
                raise FileExistsError(full) from exc
            raise StorageUnavailable(f"cannot create {full} on {self.url}: {exc}") from exc

    def write(self, path: str, chunks: Iterable[bytes]) -> int:
        full = _join(self.root, path)
        written = 0
        writer = self._create(full)
        try:
            # Chunks are pulled in the caller's thread: a chunk source may itself
            # read from HDFS (compaction), which must not block the loop.
            for chunk in chunks:
                self._run(writer.write(_as_bytes(chunk)), f"write {full}")
                written += len(chunk)
            if self.hsync:
                self._run(writer.hsync(), f"hsync {full}")
            self._run(writer.close(), f"close {full}")
        except BaseException as exc:
            self._abandon(full)
            if isinstance(exc, StorageUnavailable):
                raise
            if not isinstance(exc, Exception):
                raise
            raise StorageUnavailable(f"write of {full} on {self.url} failed: {exc}") from exc
        return written

    def open_append(self, path: str) -> AppendFile:
        full = _join(self.root, path)
        if self.pack_writer is HdfsPackWriter.PIPELINE:
            namenode, keeper = self._pipeline_clients()
            return PipelineAppendFile(namenode, keeper, path, full, replication=self.replication,
                                      block_size=self.block_size, timeout_s=self.timeout_s)
        return HdfsAppendFile(self, self._create(full), path, full)

    def _pipeline_clients(self) -> tuple[NameNodeClient, LeaseKeeper]:
        with self._writer_lock:
            if self._namenode is None or self._lease_keeper is None:
                assert self._namenode_address is not None
                host, port = self._namenode_address
                self._namenode = NameNodeClient(host, port, user=self._webhdfs_user, timeout_s=self.timeout_s)
                self._lease_keeper = LeaseKeeper(self._namenode)
            return self._namenode, self._lease_keeper

    def close(self) -> None:
        with self._writer_lock:
            namenode, self._namenode, self._lease_keeper = self._namenode, None, None
        if namenode is not None:
            namenode.close()

    def _abandon(self, full: str) -> None:
        """Remove a file whose write failed, so nothing half-written is visible."""
        try:
            self._run(self.client.delete(full), f"delete {full}")
        except Exception:
            pass  # the orphan sweep removes it later; the index does not reference it

    def _reader(self, full: str):  # noqa: ANN202
        try:
            return self._run(self.client.read(full), f"open {full}")
        except FileNotFoundError:
            raise NotFound(f"no blob at {full} on {self.url}") from None
        except StorageUnavailable:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"cannot read {full} on {self.url}: {exc}") from exc

    def _read_range(self, reader, full: str, offset: int, length: int) -> bytes:  # noqa: ANN001
        try:
            data = self._run(reader.read_range(offset, length), f"read {full}")
        except StorageUnavailable:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"cannot read {full} on {self.url}: {exc}") from exc
        if len(data) != length:
            raise StorageUnavailable(
                f"short read of {full}: expected {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return bytes(self._read_checked(path, offset, length))

    def _read_checked(self, path: str, offset: int, length: int | None, *,
                      direct: bool = True) -> bytes | bytearray:
        """hdfs-native's read (CRCs checked, a bad replica skipped); past its length, :meth:`_read_open_file`."""
        full = _join(self.root, path)
        reader = self._reader(full)
        if length is None:
            length = len(reader) - offset
        if offset + length > len(reader):
            return self._read_open_file(path, offset, length, direct=direct)
        return self._read_range(reader, full, offset, length)

    def read_unverified(self, path: str, offset: int, length: int) -> bytes | bytearray:
        """Straight from a DataNode (:mod:`pacs.storage.datanode`), sealed pack or open.

        No CRCs and no copy after the socket: the caller checks each
        object's SHA-256 and reads again through :meth:`read` what fails.
        Measured against hdfs-native, 256 MiB in 8 MiB ranges: 0.26 s of
        CPU against 0.50-0.57 s (``bench/hdfs_clients.py --sections f``).
        """
        return self._from_datanodes(path, offset, length,
                                    lambda: self._read_checked(path, offset, length, direct=False))

    def _read_open_file(self, path: str, offset: int, length: int, *, direct: bool = True) -> bytes | bytearray:
        """Read bytes hdfs-native cannot see yet: those of a file that is still being written.

        hdfs-native 0.14 reads only up to the length the NameNode reports,
        which for a file under construction leaves out its last block; the
        bytes hsync'ed to it are there all the same.  They are read straight
        from a DataNode (:mod:`pacs.storage.datanode`, with the block list
        from WebHDFS, ``storage.webhdfs_url``), or, where a DataNode will not
        serve them that way, through WebHDFS.  Packs that ingest appends to
        are read this way until they are sealed.
        """
        if self._datanodes is None:
            raise StorageUnavailable(
                f"{path} is still being written and hdfs-native cannot read it; "
                f"set storage.webhdfs_url to read open packs from their DataNodes"
            )
        if direct:
            return self._from_datanodes(path, offset, length, lambda: self._read_webhdfs(path, offset, length))
        return self._read_webhdfs(path, offset, length)

    def _read_webhdfs(self, path: str, offset: int, length: int) -> bytes:
        if self._webhdfs is None:
            self._webhdfs = WebHdfsBlobStore(self._webhdfs_url, self.root, user=self._webhdfs_user,
                                             replication=self.replication, block_size=self.block_size)
        return self._webhdfs.read(path, offset, length)

    def _from_datanodes(self, path: str, offset: int, length: int,
                        fallback: Callable[[], bytes | bytearray]) -> bytes | bytearray:
        """The range straight from the DataNodes, or ``fallback()`` where they did not serve it.

        A direct read that failed where the fallback then got the same bytes
        from the same DataNodes means they will not serve this client that way
        (a protected data-transfer port, say): after
        ``DIRECT_MISSES_BEFORE_FALLBACK`` such reads in a row, every read
        takes the fallback.
        """
        if self._datanodes is None or self._direct_misses >= DIRECT_MISSES_BEFORE_FALLBACK:
            return fallback()
        full = _join(self.root, path)
        try:
            data = self._datanodes.read(full, offset, length)
        except DataNodeReadError as exc:
            data = fallback()
            self._direct_misses += 1
            log.warning("read %s from DataNodes failed, through the client it worked%s: %s", full,
                        "; reading through hdfs-native and WebHDFS from now on"
                        if self._direct_misses == DIRECT_MISSES_BEFORE_FALLBACK else "", exc)
            return data
        self._direct_misses = 0
        return data

    def iter_read(
        self, path: str, offset: int = 0, length: int | None = None, chunk_size: int = 4 << 20
    ) -> Iterator[bytes]:
        full = _join(self.root, path)
        reader = self._reader(full)
        if length is None:
            length = len(reader) - offset
        still_open = offset + length > len(reader)
        end = offset + length
        while offset < end:
            n = min(chunk_size, end - offset)
            if still_open:
                yield bytes(self._read_open_file(path, offset, n))
            else:
                yield self._read_range(reader, full, offset, n)
            offset += n

    def delete(self, path: str) -> bool:
        full = _join(self.root, path)
        try:
            return bool(self._run(self.client.delete(full), f"delete {full}"))
        except FileNotFoundError:
            return False
        except StorageUnavailable:
            raise
        except Exception as exc:
            raise StorageUnavailable(f"cannot delete {full} on {self.url}: {exc}") from exc

    def _info(self, full: str):  # noqa: ANN202
        return self._run(self.client.get_file_info(full), f"stat {full}")

    def exists(self, path: str) -> bool:
        try:
            self._info(_join(self.root, path))
        except FileNotFoundError:
            return False
        return True

    def size(self, path: str) -> int:
        full = _join(self.root, path)
        try:
            return self._info(full).length
        except FileNotFoundError:
            raise NotFound(f"no blob at {full} on {self.url}") from None

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        base = _join(self.root, prefix)
        strip = len(self.root.rstrip("/")) + 1

        async def collect():  # noqa: ANN202
            return [status async for status in self.client.list_status(base, recursive=True)]

        try:
            statuses = self._run(collect(), f"list {base}")
        except FileNotFoundError:
            return
        for status in statuses:
            if status.isdir or posixpath.basename(status.path).startswith("."):
                continue  # folders, and temporaries of writes in flight
            yield BlobInfo(status.path[strip:], status.length)


class HdfsAppendFile(AppendFile):
    """A pack on HDFS that grows by appends through hdfs-native, each hsync'ed before :meth:`append` returns.

    hsync makes every DataNode of the pipeline persist the bytes, so an
    appended record survives the loss of any DataNode but the last.  A failed
    append (a DataNode died, a call ran past its deadline) breaks the file:
    nothing more is appended to it, and closing it does not wait on the
    broken pipeline — the NameNode's lease recovery closes it later with
    everything that was hsync'ed.
    """

    def __init__(self, store: NativeHdfsBlobStore, writer, path: str, full: str) -> None:  # noqa: ANN001
        self._store = store
        self._writer = writer
        self.path = path
        self._full = full
        self._size = 0
        self._broken = False

    @property
    def size(self) -> int:
        return self._size

    def write(self, chunks: Iterable[bytes]) -> int:
        if self._broken or self._writer is None:
            raise StorageUnavailable(f"{self._full} can no longer be appended to")
        start = self._size
        try:
            for chunk in chunks:
                self._store._run(self._writer.write(_as_bytes(chunk)), f"append to {self._full}")
                self._size += len(chunk)
        except BaseException as exc:
            raise self._failed(exc) from exc
        return start

    def start_flush(self) -> Flush:
        """hsync on the client's loop; the caller's thread goes on meanwhile (an hsync takes milliseconds)."""
        if self._broken or self._writer is None:
            raise StorageUnavailable(f"{self._full} can no longer be appended to")
        return _Hsync(self, self._store._loop.submit(self._writer.hsync(), self._store.timeout_s,
                                                     f"hsync {self._full}"))

    def begin_append(self, chunks: Iterable[bytes]) -> tuple[int, Flush]:
        """Write and hsync as one call on the client's loop, which the caller does not wait for.

        Each write handed to the loop is a round trip between two threads
        (a record is at least two: its header and the object); together with
        the hsync's they are one.  Up to ``GATHER_BYTES`` the record is
        joined into one buffer first, so that the writes happen while the
        caller goes on; a longer record is written chunk by chunk as
        :meth:`write` does, not held whole in memory.
        """
        if self._broken or self._writer is None:
            raise StorageUnavailable(f"{self._full} can no longer be appended to")
        start = self._size
        gathered: list[bytes | memoryview] = []
        total = 0
        chunks = iter(chunks)
        for chunk in chunks:
            gathered.append(chunk)
            total += len(chunk)
            if total > GATHER_BYTES:
                self.write(itertools.chain(gathered, chunks))
                return start, self.start_flush()
        record = b"".join(gathered)
        writer = self._writer

        async def write_and_hsync() -> None:
            await writer.write(record)
            await writer.hsync()

        self._size += total
        return start, _Hsync(self, self._store._loop.submit(write_and_hsync(), self._store.timeout_s,
                                                            f"append to {self._full}"))

    def _failed(self, exc: BaseException) -> BaseException:
        """Mark the file broken; the error to raise for ``exc``."""
        self._broken = True
        if isinstance(exc, StorageUnavailable) or not isinstance(exc, Exception):
            return exc
        return StorageUnavailable(f"append to {self._full} on {self._store.url} failed: {exc}")

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None or self._broken:
            return
        self._store._run(writer.close(), f"close {self._full}")


class _Hsync(Flush):
    def __init__(self, file: HdfsAppendFile, pending: _Pending) -> None:
        self._file = file
        self._pending = pending

    def wait(self) -> None:
        try:
            self._pending.result()
        except BaseException as exc:
            error = self._file._failed(exc)
            if error is exc:
                raise
            raise error from exc


class WebHdfsBlobStore(BlobStore):
    span_bytes = SPAN_BYTES
    read_ahead = READ_AHEAD

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
        # The DataNode closes whatever arrived when an HTTP upload breaks off, so
        # write under a temporary name and rename (atomic at the NameNode).
        full = _join(self.root, path)
        folder, name = posixpath.split(full)
        tmp = posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        counted = _Counter(chunks)
        try:
            self.client.write(
                tmp, data=iter(counted), overwrite=False, replication=self.replication, blocksize=self.block_size
            )
        except Exception as exc:
            self._abandon(tmp)
            raise StorageUnavailable(f"write of {full} via {self.url} failed: {exc}") from exc
        try:
            self.client.rename(tmp, full)
        except self._hdfs.util.HdfsError as exc:
            self._abandon(tmp)
            if self.exists(path):
                raise FileExistsError(full) from exc
            raise StorageUnavailable(f"rename to {full} via {self.url} failed: {exc}") from exc
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
            if "not found" in str(exc) or "FileNotFound" in str(exc) or "does not exist" in str(exc):
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
                if name.startswith("."):
                    continue
                yield BlobInfo(posixpath.join(folder, name)[strip:], int(status["length"]))


class _Counter:
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.count += len(chunk)
            yield chunk if isinstance(chunk, bytes) else bytes(chunk)  # the HTTP client frames bytes only
