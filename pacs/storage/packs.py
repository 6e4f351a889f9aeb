"""Objects written straight into append-only packs: one write and one fsync per object.

Where the blob store can append (the local filesystem), ingest does not land
each object in a file of its own: it appends the object, with the same record
header the compactor writes (see :mod:`pacs.storage.objects`), to an open pack
and ``fdatasync``'s it.  Compared with a landing file (create, write, fsync,
link into place, fsync the folder, and later copy into a pack and delete) an
object costs one write and one flush, is written once, and there is no
landing area to compact.

A :class:`PackPool` keeps the open packs of one process.  A store takes an
idle pack (or opens a new one), appends, and gives it back, so concurrent
stores never share a file and sequential ones fill the same pack; the number
of open packs is at most the number of stores that ever ran at once.  A pack
that reaches ``target_bytes`` is sealed when it is given back.  A file that
takes concurrent appends (the HDFS pipeline, ``AppendFile.concurrent``) is
shared instead: all stores of the process append to one pack, and the file
makes the records that arrive while a flush is under way durable together
with the next one.

Crash safety: an object is referenced by the index only after its append has
returned, i.e. after it is durable.  A crash during an append leaves a torn
last record that nothing references (``read_pack_records`` stops before it).
An append that fails retires its pack, so torn bytes are only ever at the end.
A pack left open by a process that died stays readable; its container row
stays ``open``.

On HDFS an append is one packet with ``syncBlock`` down the open pack's
write pipeline (``pacs.storage.hdfswriter``; 3–4 ms for 0.5 MB on the test
cluster, against about 24 ms to create, write, hsync and close a landing
file); hdfs-native cannot read an open file, so reads of an open pack go to
its DataNodes directly (``pacs.storage.datanode``) until the pack is sealed:
full, idle for ``idle_seal_s``, or at shutdown.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from pacs.storage.base import AppendFile, BlobStore, Flush

log = logging.getLogger(__name__)

PACK_PREFIX = "packs/"


def new_pack_path() -> str:
    """A fresh, unique pack path: ``packs/YYYY/MM/DD/HHMMSS-<random>.pack`` (UTC)."""
    now = datetime.now(timezone.utc)
    return f"{PACK_PREFIX}{now:%Y/%m/%d}/{now:%H%M%S}-{uuid.uuid4().hex[:16]}.pack"


@dataclass
class _OpenPack:
    file: AppendFile
    objects: int = 0
    last_used: float = 0.0  # time.monotonic() of the last append
    users: int = 0  # stores appending to it now (a concurrent file's)
    retired: bool = False  # full or broken: sealed once its last user is done


class PendingAppend:
    """A record written to a pack whose flush is under way (see :meth:`PackPool.begin_append`).

    :meth:`wait` returns once the record is durable; :meth:`release` gives
    the pack back to the pool (or seals it), and must be called last, also
    when the caller gives up on the record.  The two are apart so that a
    caller can commit what points at the record before the pack is sealed
    (sealing records the pack in the index).
    """

    def __init__(self, pool: PackPool, pack: _OpenPack, start: int, flush: Flush) -> None:
        self.path = pack.file.path
        self.start = start
        self._pool = pool
        self._pack: _OpenPack | None = pack
        self._flush: Flush | None = flush
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Return once the record is durable; raise if it cannot be."""
        flush, self._flush = self._flush, None
        if flush is None:
            if self._error is not None:
                raise self._error
            return
        try:
            flush.wait()
        except BaseException as exc:
            self._error = exc
            raise

    def release(self) -> None:
        """Give the pack back (sealed, if its flush failed or it is full)."""
        pack, self._pack = self._pack, None
        if pack is None:
            return
        if self._flush is not None:
            try:
                self.wait()
            except Exception as exc:  # noqa: BLE001 - nothing references the record; the pack is retired below
                log.warning("flush of an abandoned record in %s failed: %s", self.path, exc)
        self._pool._give_back(pack, failed=self._error is not None)


class PackPool:
    """The open packs of one process; thread-safe.

    ``on_open(path)`` runs before a new pack's first record is written and
    ``on_seal(path, size_bytes, object_count)`` after a pack is closed (the
    composition root records them in the index's container table).  With
    ``idle_seal_s``, a thread seals packs nobody has appended to for that
    long, so that a pack does not stay open after its study has arrived.

    A file that takes concurrent appends (``AppendFile.concurrent``: the HDFS
    pipeline, which groups their flushes into one packet) is shared instead:
    every store appends to the one open pack, which is sealed once it is full
    (or broken, or idle) and its last store is done.
    """

    def __init__(
        self,
        blobs: BlobStore,
        *,
        target_bytes: int,
        idle_seal_s: float | None = None,
        on_open: Callable[[str], None] | None = None,
        on_seal: Callable[[str, int, int], None] | None = None,
    ) -> None:
        if target_bytes <= 0:
            raise ValueError(f"target_bytes: expected a positive size, got {target_bytes}")
        if idle_seal_s is not None and idle_seal_s <= 0:
            raise ValueError(f"idle_seal_s: expected a positive number of seconds, got {idle_seal_s}")
        self.blobs = blobs
        self.target_bytes = target_bytes
        self.idle_seal_s = idle_seal_s
        self._on_open = on_open
        self._on_seal = on_seal
        self._idle: list[_OpenPack] = []
        self._shared: _OpenPack | None = None  # the pack every store appends to, for a concurrent file
        self._lock = threading.Lock()
        self._opening = threading.Lock()  # one new pack at a time
        self._stop = threading.Event()
        self._sealer: threading.Thread | None = None

    def append(self, header: bytes, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Append one record (header, then the object's chunks); return (pack path, offset of the header).

        Durable when it returns.  On failure the pack is retired (sealed with
        what it held before) and the error propagates.
        """
        pending = self.begin_append(header, chunks)
        try:
            pending.wait()
        finally:
            pending.release()
        return pending.path, pending.start

    def begin_append(self, header: bytes, chunks: Iterable[bytes]) -> PendingAppend:
        """Write one record and start its flush (see :class:`PendingAppend`)."""
        pack = self._take()
        try:
            start, flush = pack.file.begin_append(itertools.chain((header,), chunks))
        except BaseException:
            self._give_back(pack, failed=not pack.file.intact(), appended=False)
            raise
        return PendingAppend(self, pack, start, flush)

    def close(self) -> None:
        """Seal every idle pack and stop the idle sealer; later appends open new ones."""
        self._stop.set()
        sealer = self._sealer
        if sealer is not None and sealer is not threading.current_thread():
            sealer.join()
        with self._lock:
            idle, self._idle = self._idle, []
            shared, self._shared = self._shared, None
            if shared is not None:
                shared.retired = True  # a store still appending to it seals it when done
                if shared.users == 0:
                    idle.append(shared)
            self._sealer = None
            self._stop.clear()
        for pack in idle:
            self._seal(pack)

    def seal_idle(self, older_than_s: float) -> int:
        """Seal the idle packs last appended to more than ``older_than_s`` ago; return how many."""
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            stale = [p for p in self._idle if p.last_used <= cutoff]
            self._idle = [p for p in self._idle if p.last_used > cutoff]
            shared = self._shared
            if shared is not None and shared.users == 0 and shared.last_used <= cutoff:
                self._shared = None
                shared.retired = True
                stale.append(shared)
        for pack in stale:
            self._seal(pack)
        return len(stale)

    def _seal_idle_forever(self) -> None:
        interval = self.idle_seal_s / 4
        while not self._stop.wait(interval):
            try:
                self.seal_idle(self.idle_seal_s)
            except Exception:  # noqa: BLE001 - keep sealing later; the packs stay readable meanwhile
                log.exception("sealing idle packs failed")

    def _take(self) -> _OpenPack:
        with self._lock:
            pack = self._join_shared() or (self._idle.pop() if self._idle else None)
        if pack is not None:
            return pack
        with self._opening:
            with self._lock:  # opened by another store meanwhile
                pack = self._join_shared()
            if pack is not None:
                return pack
            path = new_pack_path()
            if self._on_open is not None:
                self._on_open(path)
            pack = _OpenPack(self.blobs.open_append(path))
            log.info("opened pack %s", path)
            with self._lock:
                if pack.file.concurrent:
                    pack.users = 1
                    self._shared = pack
                if self.idle_seal_s is not None and self._sealer is None:
                    self._sealer = threading.Thread(target=self._seal_idle_forever, name="pack-sealer", daemon=True)
                    self._sealer.start()
        return pack

    def _join_shared(self) -> _OpenPack | None:
        """The shared pack with one more user, if there is one (called with the lock held)."""
        if self._shared is not None:
            self._shared.users += 1
        return self._shared

    def _give_back(self, pack: _OpenPack, *, failed: bool = False, appended: bool = True) -> None:
        """A store is done with ``pack``: keep it for the next one, or seal it (full, or its append failed)."""
        with self._lock:
            pack.last_used = time.monotonic()
            if appended and not failed:
                pack.objects += 1
            if failed or pack.file.size >= self.target_bytes:
                pack.retired = True
                if self._shared is pack:
                    self._shared = None
            if pack.file.concurrent:
                pack.users -= 1
                seal = pack.retired and pack.users == 0
            else:
                seal = pack.retired
                if not seal:
                    self._idle.append(pack)
        if seal:
            self._seal(pack)

    def _seal(self, pack: _OpenPack) -> None:
        try:
            pack.file.close()
        except Exception as exc:  # noqa: BLE001 - every record in it was made durable when appended
            log.warning("closing pack %s: %s", pack.file.path, exc)
        log.info("sealed pack %s: %d objects, %.1f MB", pack.file.path, pack.objects, pack.file.size / 1e6)
        if self._on_seal is not None:
            try:
                self._on_seal(pack.file.path, pack.file.size, pack.objects)
            except Exception as exc:  # noqa: BLE001 - the container row is bookkeeping; the objects are indexed
                log.warning("could not record pack %s as sealed: %s", pack.file.path, exc)


__all__ = ["PACK_PREFIX", "PackPool", "new_pack_path"]
