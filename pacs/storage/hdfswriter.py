"""Appending to a pack on HDFS through a write pipeline of our own: one packet per hsync'ed record.

Why not hdfs-native's writer: its ``hsync`` sends the data, then a packet of
its own to ask for the fsync, and then calls the NameNode's ``fsync`` to
record the file's new length, every time.  With one ``hsync`` per stored
instance that is a NameNode edit-log sync and twice the DataNode packets per
instance.  Hadoop's own client calls ``fsync`` on the NameNode only for the
first sync of a block, and so does this writer: never, because the index
(not the NameNode) says how far a pack's bytes go, and a reader of an open
pack asks its DataNodes (``pacs.storage.datanode``), which serve a block
being written up to what the whole pipeline acknowledged.

How a pack is written (Hadoop's ``DataTransferProtocol``, version 28):

* ``create`` on the NameNode (:mod:`pacs.storage.namenode`), then
  ``addBlock``: the block and its pipeline of DataNodes;
* ``WRITE_BLOCK`` (``PIPELINE_SETUP_CREATE``) to the first DataNode, which
  sets up the rest of the pipeline; CRC32C per 512 bytes, as Hadoop's client;
* each :meth:`PipelineAppendFile.start_flush` sends what was written since
  the last one as one packet (up to ``PACKET_DATA_BYTES``; a longer record
  is several, the last flagged) with ``syncBlock`` set: every DataNode of the
  pipeline writes and fsyncs it before it acknowledges.  :class:`Flush`
  ``.wait`` returns when the acknowledgement of that packet is back from the
  whole pipeline: the record is on the disks of every replica;
* a packet starts on a checksum-chunk boundary, so a record that ended in
  the middle of a chunk is sent again from the chunk's start with the next
  one (as Hadoop's client does after an ``hflush``); the DataNode writes
  only the new bytes and replaces the chunk's checksum;
* a block that fills up gets its last packet, and ``addBlock`` (with the
  full block's length) the next one;
* closing sends the last packet and ``complete``\\ s the file on the
  NameNode, retried while the DataNodes have not reported the block.

Failures: any error of the pipeline (a DataNode gone or refusing, a bad
acknowledgement, a timeout) breaks the file; what earlier flushes
acknowledged stays on every DataNode.  Nothing more is appended to it (the
pack pool retires it and opens another) and closing it asks the NameNode
to ``recoverLease``: it closes the file with what the DataNodes hold.  No
pipeline recovery is attempted: a new pack is cheaper than one.

A :class:`LeaseKeeper` thread per NameNode renews the process's lease while
files are open and sends heartbeat packets down pipelines that have been
idle for a while, as Hadoop's client does, so that DataNodes do not time
them out between studies.
"""

from __future__ import annotations

import array
import logging
import socket
import struct
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import crc32c

from pacs.errors import StorageUnavailable
from pacs.sockio import send_pieces
from pacs.storage.base import AppendFile, Flush
from pacs.storage.datanode import DATA_TRANSFER_VERSION, STATUS_SUCCESS
from pacs.storage.namenode import NameNodeClient, NameNodeError, NewBlock
from pacs.storage.protowire import (
    delimited,
    field_bytes,
    field_sfixed32,
    field_sfixed64,
    field_varint,
    fields,
    one_int,
    one_str,
    recv_delimited,
    unzigzag,
)

log = logging.getLogger(__name__)

OP_WRITE_BLOCK = 80
PIPELINE_SETUP_CREATE = 6
CHECKSUM_CRC32C = 2
# A CRC32C per 4 KiB of block, where Hadoop's client takes one per 512 bytes
# (``dfs.bytes-per-checksum``: a block's chunk size is the writer's choice,
# kept in its meta file, and readers take it from there; HBase checksums its
# files per 16 KiB).  Each chunk is one call into crc32c from Python: 1,024
# calls for a 0.5 MB CT cost 0.22-0.39 ms, 128 cost 0.05.  What the larger
# chunk costs instead: a record that ends inside a chunk has that chunk's
# start (now up to 4 KiB, 2 KiB on average) sent again with the next packet,
# and a read starts at most 4 KiB before the object it wants.
BYTES_PER_CHECKSUM = 4096
# Data per packet: one packet carries a typical instance whole (the
# DataNode takes up to 16 MiB); longer records are cut into packets this long.
PACKET_DATA_BYTES = 1 << 20
HEARTBEAT_SEQNO = -1
# Packets sent before their acknowledgements are read (Hadoop's client: 80).
MAX_UNACKED = 64
# A pipeline idle this long gets a heartbeat packet (Hadoop's client: half
# the DataNodes' 60 s socket timeout).
HEARTBEAT_AFTER_S = 20.0
LEASE_RENEW_S = 15.0
SETUP_ATTEMPTS = 3


class PipelineError(StorageUnavailable):
    """The write pipeline of a pack failed; the pack takes no more appends."""


class PipelineSetupError(PipelineError):
    """A DataNode refused to join a new block's pipeline (``bad_link`` is the one to leave out)."""

    def __init__(self, bad_link: str, message: str) -> None:
        super().__init__(message)
        self.bad_link = bad_link


def chunk_checksums(data: bytes | bytearray | memoryview, lead: bytes = b"") -> bytes:
    """CRC32C of each ``BYTES_PER_CHECKSUM`` chunk of ``lead`` + ``data`` (the last may be shorter), big-endian.

    ``lead`` (shorter than a chunk: the partial chunk sent again) is not
    joined to ``data``: the first chunk's sum is carried across the two.
    """
    view = memoryview(data)
    start = 0
    sums = array.array("I")
    if lead:
        if len(lead) >= BYTES_PER_CHECKSUM:
            raise ValueError(f"a lead of {len(lead)} bytes: expected less than a chunk ({BYTES_PER_CHECKSUM})")
        start = min(BYTES_PER_CHECKSUM - len(lead), len(view))
        sums.append(crc32c.crc32c(view[:start], crc32c.crc32c(lead)))
    sums.extend([crc32c.crc32c(view[i:i + BYTES_PER_CHECKSUM]) for i in range(start, len(view), BYTES_PER_CHECKSUM)])
    if sums.itemsize != 4:  # pragma: no cover - "I" is 32 bits on every platform Python supports here
        raise RuntimeError("array('I') is not 32-bit")
    sums.byteswap()  # little-endian hosts; the protocol is big-endian
    return sums.tobytes()


def packet_header(offset_in_block: int, seqno: int, data_len: int, *, last: bool, sync: bool) -> bytes:
    """PacketHeaderProto."""
    return (field_sfixed64(1, offset_in_block) + field_sfixed64(2, seqno) + field_varint(3, int(last))
            + field_sfixed32(4, data_len) + field_varint(5, int(sync)))


def write_block_request(block: NewBlock, client_name: str) -> bytes:
    """OpWriteBlockProto that sets up a pipeline for a new block through ``block.targets``."""
    located = block.located
    header = field_bytes(1, located.header(client_name))
    checksum = field_varint(1, CHECKSUM_CRC32C) + field_varint(2, BYTES_PER_CHECKSUM)
    return (header
            + b"".join(field_bytes(2, target) for target in block.targets[1:])
            + field_varint(4, PIPELINE_SETUP_CREATE) + field_varint(5, len(block.targets))
            + field_varint(6, 0) + field_varint(7, 0) + field_varint(8, located.generation_stamp)
            + field_bytes(9, checksum))


def _send_all(sock: socket.socket, head: bytes, *payload: bytes | memoryview) -> None:
    """``head`` then each piece of ``payload`` in as few system calls as the socket takes."""
    if sum(len(piece) for piece in payload) <= 1 << 16:
        sock.sendall(b"".join((head, *payload)))
        return
    send_pieces(sock, [head, *payload])


class _Pipeline:
    """The connection to the first DataNode of one block's pipeline."""

    def __init__(self, block: NewBlock, client_name: str, timeout_s: float) -> None:
        self.block = block
        host, port = block.located.datanodes[0]
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request = write_block_request(block, client_name)
            self.sock.sendall(struct.pack(">hB", DATA_TRANSFER_VERSION, OP_WRITE_BLOCK) + delimited(request))
            reply = fields(recv_delimited(self.sock, "DataNode"))
            status = one_int(reply, 1, -1)
            if status != STATUS_SUCCESS:
                bad = one_str(reply, 2)
                raise PipelineSetupError(bad or f"{host}:{port}",
                                         f"DataNode {host}:{port} refused the pipeline of block "
                                         f"{block.located.block_id} (status {status}"
                                         + (f", first bad link {bad}" if bad else "") + f"): {one_str(reply, 5)}")
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()


class PipelineAppendFile(AppendFile):
    """A new HDFS file written through our own pipeline; every flush is one packet with ``syncBlock``.

    Thread-safe, for stores appending to one pack at once (``concurrent``):
    records go in whole, one after the other, and their syncs are grouped.
    At most one sync packet is in flight; records written meanwhile wait and
    go in the next one together, so concurrent stores share packets (and the
    DataNodes' fsyncs) instead of each sending its own.  The thread waiting
    for its record reads the acknowledgements for everyone while others wait
    for it (no thread of its own per pipeline).
    """

    concurrent = True

    def __init__(self, namenode: NameNodeClient, keeper: LeaseKeeper, path: str, full: str, *,
                 replication: int, block_size: int, timeout_s: float) -> None:
        if block_size % BYTES_PER_CHECKSUM:
            raise ValueError(f"block size {block_size}: expected a multiple of {BYTES_PER_CHECKSUM}")
        self.path = path
        self.full = full
        self._nn = namenode
        self._keeper = keeper
        self._block_size = block_size
        self._timeout_s = timeout_s
        self._file_id = namenode.create(full, replication=replication, block_size=block_size)
        self._pipeline: _Pipeline | None = None
        self._last_block: bytes | None = None  # ExtendedBlockProto of the last full block, for addBlock/complete
        self._in_block = 0  # bytes of the current block sent
        self._tail = b""  # the current block's last partial chunk, sent again with the next packet
        self._pending = bytearray()  # written, not yet sent
        self._size = 0  # bytes written (the file's end once all is sent)
        self._sent = 0  # bytes handed to the pipeline
        self._durable = 0  # bytes acknowledged by every DataNode after a sync
        self._seqno = 0  # the next packet's, in the current block
        self._acked = -1  # highest seqno acknowledged by the whole pipeline
        self._sync: tuple[int, int] | None = None  # (seqno, bytes it makes durable) of the sync in flight
        self._last_sent = time.monotonic()
        self._broken: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._writing = False  # a thread has the pipeline to write a record (possibly across waits)
        self._reading = False  # a thread is reading acknowledgements, without the lock
        keeper.add(self)

    @property
    def size(self) -> int:
        return self._size

    def intact(self) -> bool:
        return self._broken is None and not self._closed

    # --- appending ------------------------------------------------------------

    def begin_append(self, chunks: Iterable[bytes]) -> tuple[int, Flush]:
        """Write the record whole; send it at once with a sync if none is in flight, else with the next one."""
        with self._cond, self._turn():
            start = self._write(chunks)
            if self._sync is None:
                self._send_sync()
            return start, _GroupFlush(self, self._size)

    def write(self, chunks: Iterable[bytes]) -> int:
        with self._cond, self._turn():
            return self._write(chunks)

    def start_flush(self) -> Flush:
        with self._cond, self._turn():
            if self._sync is None:
                self._send_sync()
            return _GroupFlush(self, self._size)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """The pipeline to this thread for writing (called with the lock held; waits for another writer)."""
        self._check()
        while self._writing:
            self._cond.wait(1.0)
            self._check()
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
            self._cond.notify_all()

    def _write(self, chunks: Iterable[bytes]) -> int:
        """Append a record's chunks; a chunk source that fails takes the record back while none of it was sent.

        (The source is the caller's: an object shorter or longer than it
        said, a file that cannot be read.  Other stores appending to the
        pack go on; only a record partly sent breaks the pack.)
        """
        start = self._size
        chunks = iter(chunks)
        while True:
            try:
                chunk = next(chunks, None)
            except BaseException as exc:
                if self._sent <= start:  # _pending holds the bytes from _sent on
                    del self._pending[start - self._sent:]
                    self._size = start
                    raise
                raise self._fail(PipelineError(f"a record of {self.full} failed half-sent: {exc}")) from exc
            if chunk is None:
                return start
            try:
                self._pending += chunk
                self._size += len(chunk)
                full = len(self._pending) - len(self._pending) % PACKET_DATA_BYTES
                if full:
                    self._send_pending(full, sync=False)
            except BaseException as exc:
                raise self._fail(exc) from exc

    def _send_sync(self) -> None:
        """Send everything written so far, the last packet with ``syncBlock`` (needs the turn)."""
        try:
            if self._pending:
                self._send_pending(len(self._pending), sync=True)
            elif self._pipeline is not None and self._durable < self._sent:
                self._send_packet(b"", sync=True)
        except BaseException as exc:
            raise self._fail(exc) from exc

    def _await_durable(self, end: int) -> None:
        """Return once the first ``end`` bytes are on every DataNode of the pipeline."""
        with self._cond:
            while self._durable < end:
                self._check_broken()
                if self._sync is None:  # the records up to ``end`` wait for a sync: send it
                    with self._turn():
                        if self._sync is None and self._durable < end:
                            self._send_sync()
                    continue
                self._read_or_wait()

    def _check(self) -> None:
        if self._broken is not None or self._closed:
            raise PipelineError(f"{self.full} can no longer be appended to"
                                + (f" ({self._broken})" if self._broken is not None else ""))

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise PipelineError(f"{self.full}: {self._broken}")

    def _send_pending(self, count: int, *, sync: bool) -> None:
        """Send the first ``count`` pending bytes, in packets that stay within blocks; the last one synced."""
        buffer = self._pending
        self._pending = buffer[count:]
        data = memoryview(buffer)[:count]
        while data:
            self._ensure_block()
            piece = data[:min(self._block_size - self._in_block, PACKET_DATA_BYTES)]
            data = data[len(piece):]
            self._send_packet(piece, sync=sync and not data)

    def _ensure_block(self) -> None:
        if self._pipeline is not None and self._in_block == self._block_size:
            self._end_block()
        if self._pipeline is None:
            self._start_block()

    def _send_packet(self, piece: bytes | memoryview, *, sync: bool, last: bool = False) -> None:
        """One packet of ``piece`` (after the partial chunk sent last, again), or an empty one to sync or end."""
        pipeline = self._pipeline
        assert pipeline is not None
        tail = self._tail if piece else b""
        # the DataNode syncs (or ends the block) on an empty packet; it writes nothing for one
        sums = chunk_checksums(piece, lead=tail) if piece else b""
        length = len(tail) + len(piece)
        header = packet_header(self._in_block - len(tail), self._seqno, length, last=last, sync=sync)
        _send_all(pipeline.sock, struct.pack(">iH", 4 + len(sums) + length, len(header)) + header + sums,
                  tail, piece)
        self._sent += len(piece)
        if sync:
            self._sync = (self._seqno, self._sent)
        self._seqno += 1
        self._last_sent = time.monotonic()
        if piece:
            self._in_block += len(piece)
            partial = length % BYTES_PER_CHECKSUM
            if partial > len(piece):  # the chunk sent again is still not full
                self._tail = tail + bytes(piece)
            else:
                self._tail = bytes(piece[len(piece) - partial:]) if partial else b""
        while self._seqno - 1 - self._acked > MAX_UNACKED:
            self._read_or_wait()

    def _read_or_wait(self) -> None:
        """Read one acknowledgement, or wait while another thread reads one (called with the lock held)."""
        if self._reading:
            self._cond.wait(1.0)
            return
        pipeline = self._pipeline
        if pipeline is None:
            raise PipelineError(f"{self.full}: no pipeline to wait on")
        self._reading = True
        self._cond.release()
        try:
            raw = recv_delimited(pipeline.sock, "DataNode")
            error: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - raised below, with the lock held again
            error = exc
        finally:
            self._cond.acquire()
            self._reading = False
            self._cond.notify_all()
        if error is not None:
            raise self._fail(error) from error
        if pipeline is not self._pipeline:
            return
        try:
            self._acknowledged(pipeline, fields(raw))
        except BaseException as exc:
            raise self._fail(exc) from exc

    def _acknowledged(self, pipeline: _Pipeline, ack: dict) -> None:
        """Take in one acknowledgement (heartbeats' are skipped); PipelineError if a DataNode did not succeed."""
        seqno = unzigzag(one_int(ack, 1, 0))
        replies = [value for value in ack.get(2, ()) if isinstance(value, int)]
        for position, status in enumerate(replies):
            if status != STATUS_SUCCESS:
                nodes = pipeline.block.located.datanodes
                node = nodes[position] if position < len(nodes) else ("?", 0)
                raise PipelineError(f"DataNode {node[0]}:{node[1]} answered status {status} for packet {seqno} "
                                    f"of block {pipeline.block.located.block_id}")
        if seqno == HEARTBEAT_SEQNO:
            return
        if seqno != self._acked + 1:
            raise PipelineError(f"acknowledgement of packet {seqno}, expected {self._acked + 1}")
        self._acked = seqno
        if self._sync is not None and seqno >= self._sync[0]:
            self._durable = max(self._durable, self._sync[1])
            self._sync = None

    def _fail(self, exc: BaseException) -> BaseException:
        """Break the file; the error to raise for ``exc``."""
        if self._broken is None:
            self._broken = exc
            if self._pipeline is not None:
                self._pipeline.close()
            self._cond.notify_all()
            log.warning("pack %s broke: %s", self.full, exc)
        if isinstance(exc, StorageUnavailable) or not isinstance(exc, Exception):
            return exc
        return PipelineError(f"append to {self.full} failed: {exc}")

    # --- blocks ---------------------------------------------------------------

    def _start_block(self) -> None:
        excluded: list[bytes] = []
        errors: list[str] = []
        for _ in range(SETUP_ATTEMPTS):
            block = self._nn.add_block(self.full, self._file_id, self._last_block, tuple(excluded))
            if not block.targets:
                raise PipelineError(f"the NameNode gave block {block.located.block_id} of {self.full} no DataNodes")
            try:
                self._pipeline = _Pipeline(block, self._nn.client_name, self._timeout_s)
            except (OSError, ValueError, PipelineSetupError) as exc:
                errors.append(str(exc))
                bad = exc.bad_link if isinstance(exc, PipelineSetupError) else "%s:%d" % block.located.datanodes[0]
                excluded.extend(target for target, address in zip(block.targets, block.located.datanodes)
                                if f"{address[0]}:{address[1]}" == bad)
                self._nn.abandon_block(self.full, self._file_id, block.extended(0))
                continue
            self._in_block = 0
            self._tail = b""
            self._acked = -1
            self._seqno = 0
            return
        raise PipelineError(f"no pipeline for a block of {self.full}: " + "; ".join(errors))

    def _end_block(self) -> None:
        """Send the block's last packet, wait for the pipeline to acknowledge everything, close it (needs the turn)."""
        pipeline = self._pipeline
        assert pipeline is not None
        self._send_packet(b"", sync=True, last=True)
        while self._acked < self._seqno - 1:
            self._check_broken()
            self._read_or_wait()
        pipeline.close()
        self._pipeline = None
        self._last_block = pipeline.block.extended(self._in_block)

    # --- closing --------------------------------------------------------------

    def close(self) -> None:
        error: BaseException | None = None
        with self._cond:
            if self._closed:
                return
            if self._broken is None:
                try:
                    with self._turn():
                        self._closed = True  # no more appends
                        if self._pending:
                            self._send_pending(len(self._pending), sync=True)
                        if self._pipeline is not None:
                            self._end_block()
                        self._durable = self._size
                        self._complete()
                except BaseException as exc:
                    error = self._fail(exc)
            self._closed = True
            self._keeper.remove(self)
            if self._broken is None:
                return
            if self._pipeline is not None:
                self._pipeline.close()
        self._recover()
        if error is not None:
            raise error

    def _complete(self) -> None:
        delay = 0.01
        deadline = time.monotonic() + self._timeout_s
        while not self._nn.complete(self.full, self._file_id, self._last_block):
            if time.monotonic() > deadline:
                raise PipelineError(f"the NameNode did not close {self.full} within {self._timeout_s:.0f} s "
                                    "(its DataNodes have not reported the last block)")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _recover(self) -> None:
        """Have the NameNode close the broken file with what its DataNodes hold (it does so in the background)."""
        try:
            self._nn.recover_lease(self.full)
        except (StorageUnavailable, NameNodeError) as exc:
            log.warning("lease recovery of %s could not start: %s (the NameNode recovers it when the lease "
                        "expires)", self.full, exc)

    # --- idle pipelines -------------------------------------------------------

    def heartbeat_if_idle(self, idle_s: float) -> None:
        """Send a heartbeat packet if nothing went down the pipeline for ``idle_s`` (without waiting for others)."""
        if not self._lock.acquire(blocking=False):
            return  # in use: not idle
        try:
            pipeline = self._pipeline
            if (pipeline is None or self._broken is not None or self._closed or self._writing
                    or time.monotonic() - self._last_sent < idle_s):
                return
            header = packet_header(0, HEARTBEAT_SEQNO, 0, last=False, sync=False)  # as Hadoop's client
            try:
                pipeline.sock.sendall(struct.pack(">iH", 4, len(header)) + header)
                self._last_sent = time.monotonic()
            except OSError as exc:
                self._fail(exc)
        finally:
            self._lock.release()


class _GroupFlush(Flush):
    def __init__(self, file: PipelineAppendFile, end: int) -> None:
        self._file = file
        self._end = end

    def wait(self) -> None:
        self._file._await_durable(self._end)


class LeaseKeeper:
    """Renews one client's lease while it has files open, and keeps their idle pipelines alive."""

    def __init__(self, namenode: NameNodeClient) -> None:
        self._nn = namenode
        self._files: weakref.WeakSet[PipelineAppendFile] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, file: PipelineAppendFile) -> None:
        with self._lock:
            self._files.add(file)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="hdfs-lease", daemon=True)
                self._thread.start()

    def remove(self, file: PipelineAppendFile) -> None:
        with self._lock:
            self._files.discard(file)

    def _run(self) -> None:
        tick = min(LEASE_RENEW_S, HEARTBEAT_AFTER_S) / 3
        last_renewal = time.monotonic()
        while True:
            self._wake.wait(tick)
            with self._lock:
                files = list(self._files)
                if not files:
                    self._thread = None
                    return
            for file in files:
                file.heartbeat_if_idle(HEARTBEAT_AFTER_S)
            if time.monotonic() - last_renewal >= LEASE_RENEW_S:
                try:
                    self._nn.renew_lease()
                    last_renewal = time.monotonic()
                except StorageUnavailable as exc:
                    log.warning("renewing the HDFS lease of %s failed: %s", self._nn.client_name, exc)


__all__ = ["LeaseKeeper", "PipelineAppendFile", "PipelineError", "chunk_checksums"]
