"""The one path by which a DICOM object enters the archive.

``store`` checks the object's structure, parses the indexed attributes (never
the pixel data), writes the original bytes to the store, commits the index row
and only then returns — so a caller that acknowledges on return acknowledges
only what is durable.  If indexing fails, the bytes just written are removed.

Re-sends are idempotent: the same SOP Instance UID with the same bytes is a
no-op success; with different bytes the configured :class:`DuplicatePolicy`
decides and the decision is logged.
"""

from __future__ import annotations

import enum
import hashlib
import io
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pacs.errors import (
    DuplicateConflict,
    IndexConflict,
    InvalidObject,
    ObjectTooLarge,
    StorageUnavailable,
)
from pacs.index.database import Database, explicit_transaction
from pacs.index.models import utcnow
from pacs.index.repository import (
    InstanceAttributes,
    add_instance,
    count_in_and_commit,
    find_instance,
    find_location,
    insert_into_indexed_series,
    location_of,
    replace_location,
)
from pacs.ingest.parse import read_attributes
from pacs.settings import DuplicatePolicy, StorageSettings
from pacs.storage.compaction import Compactor
from pacs.storage.objects import Location, ObjectStore, PendingPut

log = logging.getLogger(__name__)

CHUNK = 1 << 20
STORE_ATTEMPTS = 3  # a write that fails on a dying DataNode is retried on a new pipeline


class StoreOutcome(str, enum.Enum):
    STORED = "stored"  # new instance, bytes written and indexed
    DUPLICATE = "duplicate"  # same UID, same bytes: nothing to do
    KEPT_EXISTING = "kept-existing"  # same UID, different bytes, policy keep-first
    OVERWRITTEN = "overwritten"  # same UID, different bytes, policy overwrite


@dataclass(frozen=True)
class StoreResult:
    outcome: StoreOutcome
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    location: Location

    @property
    def length(self) -> int:
        return self.location.length


class BufferChain(io.RawIOBase):
    """An object held in memory as consecutive buffers, read as one seekable stream.

    Lets a receiver hand over "file meta + the dataset buffer it already
    holds" without joining them into a new copy.  The buffers must not
    change while the object is stored, so it is hashed only once, like bytes.
    ``sha256``: the hex SHA-256 of the buffers together, when the receiver
    computed it as they arrived; ingest then does not hash them again.
    """

    def __init__(self, *parts: bytes | memoryview, sha256: str | None = None) -> None:
        super().__init__()
        self.sha256 = sha256
        self._parts = [memoryview(p).cast("B") for p in parts]
        self._starts = []
        total = 0
        for part in self._parts:
            self._starts.append(total)
            total += len(part)
        self._size = total
        self._pos = 0

    def readable(self) -> bool:
        return True

    def views(self) -> list[memoryview]:
        """The buffers themselves, valid until the chain is closed."""
        if self.closed:
            raise ValueError("I/O operation on closed BufferChain")
        return list(self._parts)

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        for part in self._parts:
            part.release()  # the owners of the buffers may resize them again
        self._parts = []
        super().close()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:  # noqa: ANN001 - any writable buffer
        target = memoryview(buffer).cast("B")
        done = 0
        for start, part in zip(self._starts, self._parts):
            if done == len(target) or self._pos >= self._size:
                break
            end = start + len(part)
            if self._pos >= end:
                continue
            take = min(end - self._pos, len(target) - done)
            target[done:done + take] = part[self._pos - start:self._pos - start + take]
            done += take
            self._pos += take
        return done


class ReceivedFile:
    """An object a receiver spooled to an unnamed temporary file, read as that file.

    No other process can reach such a file (it has no name), so like a
    :class:`BufferChain` it cannot change while it is stored and is hashed
    once.  ``sha256``: the hex SHA-256 of its bytes, when the receiver
    computed it as they arrived; ingest then does not hash them again.
    """

    def __init__(self, file: BinaryIO, sha256: str | None = None) -> None:
        self._file = file
        self.sha256 = sha256
        self.name = "<received object>"

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


Source = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO | BufferChain | ReceivedFile


class IngestService:
    def __init__(
        self,
        objects: ObjectStore,
        db: Database,
        settings: StorageSettings,
        compactor: Compactor | None = None,
        *,
        recoverable_appends: bool = False,
    ) -> None:
        """``recoverable_appends``: what is appended to packs can be indexed
        again from them after a crash (:mod:`pacs.ingest.recovery`), so the
        commit of a new instance need not wait for the index's log flush."""
        self.objects = objects
        self.db = db
        self.settings = settings
        self.compactor = compactor
        self.max_bytes = settings.max_object_mb << 20
        self.flush_commits = not (recoverable_appends and objects.packs is not None)

    def store(self, source: Source, *, source_ae: str = "", write_first: bool = False) -> StoreResult:
        """Store one Part 10 object from bytes, a path or a seekable binary file.

        ``write_first``: the caller expects a new SOP Instance UID (a sender
        that has sent only new instances so far).  On a client-server index
        the bytes are then written, and their flush started, with no look-up
        ahead of them: the row's insert tells a UID indexed already.  A
        re-send found that way leaves its record unreferenced in the pack,
        so callers turn this off for a sender once it re-sends anything.
        The embedded index looks up in process and ignores it.
        """
        with _open(source) as (fp, size, name):
            if size > self.max_bytes:
                raise ObjectTooLarge(
                    f"{name}: {size} bytes exceeds the limit of {self.max_bytes} bytes "
                    f"(storage.max_object_mb={self.settings.max_object_mb})"
                )
            try:
                attrs = read_attributes(fp, size)
            except InvalidObject as exc:
                raise InvalidObject(f"{name}: {exc}") from None
            sha256 = (source.sha256 if isinstance(source, (BufferChain, ReceivedFile)) else None) or _digest(fp)
            # an in-memory source was copied into a private buffer (a received one may be in a
            # private file): it cannot change before it is written, so it is hashed once; a file
            # anyone may write to is hashed again as it streams
            verify = not isinstance(source, (bytes, bytearray, memoryview, BufferChain, ReceivedFile))
            result = self._store_parsed(fp, attrs, sha256, size, source_ae, verify, write_first)
        if self.compactor is not None and result.outcome is not StoreOutcome.DUPLICATE:
            self.compactor.after_store()
        return result

    def _store_parsed(
        self, fp: BinaryIO, attrs: InstanceAttributes, sha256: str, size: int, source_ae: str, verify: bool,
        write_first: bool,
    ) -> StoreResult:
        delay = 0.5
        for attempt in range(1, STORE_ATTEMPTS + 1):
            try:
                return self._store_once(fp, attrs, sha256, size, source_ae, verify, write_first)
            except StorageUnavailable as exc:  # a write that failed on a dying DataNode gets a new pipeline
                if attempt == STORE_ATTEMPTS:
                    raise
                log.warning(
                    "write of SOP instance %s failed (attempt %d of %d), retrying: %s",
                    attrs.sop_instance_uid, attempt, STORE_ATTEMPTS, exc,
                )
                time.sleep(delay)
                delay *= 2
            except IndexConflict as exc:  # rolled back for a concurrent store: run it again, a moment later
                if attempt == STORE_ATTEMPTS:
                    raise
                log.info("index transaction of SOP instance %s conflicted (attempt %d of %d), retrying: %s",
                         attrs.sop_instance_uid, attempt, STORE_ATTEMPTS, str(exc).splitlines()[0])
                time.sleep(random.uniform(0.005, 0.05) * attempt)
        raise AssertionError("unreachable")

    def _store_once(
        self, fp: BinaryIO, attrs: InstanceAttributes, sha256: str, size: int, source_ae: str, verify: bool,
        write_first: bool,
    ) -> StoreResult:
        """One try on SQLite; the common case (a new UID) is one index transaction around the write.

        The transaction looks the UID up, the bytes are written and flushed,
        and then the rows are inserted and committed: nothing ever points at
        bytes that are not durable.  The rows go in after the flush, not
        beside it: the first insert takes SQLite's one write lock until the
        commit, and rows inserted while the flush ran kept every other store
        (another association, another worker) off the index for the whole
        flush, sleeping in SQLite's busy handler (docs/storage.md has the
        measurements).  With recoverable appends the commit does not flush the index's log:
        the flushed record in the pack is the durable copy.
        """
        if self.db.statements_commit_alone:
            return self._store_once_autocommit(fp, attrs, sha256, size, source_ae, verify, write_first)
        uid = attrs.sop_instance_uid
        pending: PendingPut | None = None
        try:
            with self.db.transaction(flush_commit=self.flush_commits) as conn:
                existing = find_location(conn, uid)
                if existing is None:
                    pending = self._begin_put(fp, sha256, verify, size)
                    pending.wait()  # durable before anything points at it; the index's write lock not yet taken
                    instance_pk = add_instance(conn, attrs, pending.location, source_ae=source_ae)
                    if instance_pk is not None:
                        return self._result(StoreOutcome.STORED, attrs, pending.location)
                    # indexed by another process since the look-up: settled below
        except BaseException:
            if pending is not None:
                self._discard(pending.location)
            raise
        finally:
            if pending is not None:
                pending.release()  # after the commit: sealing a full pack writes to the index
        if existing is not None:
            return self._store_over(fp, attrs, existing, sha256, size, source_ae, verify)
        return self._settle(attrs, pending.location, None, sha256, source_ae)  # indexed by another process meanwhile

    def _store_over(
        self, fp: BinaryIO, attrs: InstanceAttributes, existing: Location, sha256: str, size: int, source_ae: str,
        verify: bool,
    ) -> StoreResult:
        """A UID indexed already: the duplicate policy's answer, or (overwrite) the new bytes written and indexed."""
        early = self._resolve_duplicate(attrs, existing, sha256, source_ae)
        if early is not None:
            return early
        location = self.objects.put(_chunks(fp), sha256=sha256, verify=verify, length=size)
        return self._settle(attrs, location, existing, sha256, source_ae)

    def _store_once_autocommit(
        self, fp: BinaryIO, attrs: InstanceAttributes, sha256: str, size: int, source_ae: str, verify: bool,
        write_first: bool,
    ) -> StoreResult:
        """One try on a client-server index (Postgres): the row goes in while the bytes are flushed.

        The look-up commits alone.  Then the write and its flush start, and
        on the same connection a transaction begun by hand inserts the row
        into its series while the flush runs (the round trip and the
        insert's index updates overlap the flush instead of adding to it).
        Once the bytes are durable, the counters' updates and the ``COMMIT``
        go as one round trip.  The counters are bumped only then, so a
        concurrent store into the series never waits for this flush on
        their rows.  Nothing needs the look-up and the insert in one
        transaction: the insert does nothing for a UID indexed meanwhile,
        which is then settled like a re-send.  The first instance of a
        series not yet indexed takes the general path, in a transaction.

        The ``BEGIN`` goes with the insert, so a store of a known series is
        three round trips, one of them after the flush.  With ``write_first``
        the write and its flush start first and there is no look-up: the
        insert, which does nothing for a UID indexed already, tells, and the
        store is two round trips.  A re-send found that way is looked up and
        answered as usual; its record stays in the pack unreferenced, or
        becomes the instance's bytes when the duplicate policy overwrites.
        """
        uid = attrs.sop_instance_uid
        existing: Location | None = None
        pending = self._begin_put(fp, sha256, verify, size) if write_first else None
        try:
            with self.db.autocommit() as conn:
                if not write_first:
                    existing = find_location(conn, uid)
                if existing is None:
                    pending = pending or self._begin_put(fp, sha256, verify, size)
                    with explicit_transaction(conn):
                        now = utcnow()
                        instance_pk, series = insert_into_indexed_series(conn, attrs, pending.location,
                                                                         source_ae=source_ae, now=now, begin=True)
                        pending.wait()  # durable before the row commits
                        if instance_pk is not None:
                            count_in_and_commit(conn, series, now)
                    if write_first and instance_pk is None and series is not None:  # the UID is indexed
                        existing = find_location(conn, uid)
            if existing is None and series is None:
                with self.db.transaction() as conn:
                    instance_pk = add_instance(conn, attrs, pending.location, source_ae=source_ae)
            if existing is not None and pending is not None:  # written before the look-up found the UID
                early = self._resolve_duplicate(attrs, existing, sha256, source_ae)
                if early is not None:
                    self._discard(pending.location)
                    return early
                pending.wait()  # the policy overwrites: these bytes replace the stored ones
        except BaseException:
            if pending is not None:
                self._discard(pending.location)
            raise
        finally:
            if pending is not None:
                pending.release()  # last: sealing a full pack writes to the index
        if existing is not None:
            if pending is None:
                return self._store_over(fp, attrs, existing, sha256, size, source_ae, verify)
            return self._settle(attrs, pending.location, existing, sha256, source_ae)
        if instance_pk is not None:
            return self._result(StoreOutcome.STORED, attrs, pending.location)
        return self._settle(attrs, pending.location, None, sha256, source_ae)  # indexed by another process meanwhile

    def _begin_put(self, fp: BinaryIO, sha256: str, verify: bool, size: int) -> PendingPut:
        return self.objects.begin_put(_chunks(fp), sha256=sha256, verify=verify, length=size)

    def _settle(
        self, attrs: InstanceAttributes, location: Location, existing: Location | None, sha256: str, source_ae: str
    ) -> StoreResult:
        """Index bytes written for a UID that is indexed already (the overwrite policy, or a race)."""
        uid = attrs.sop_instance_uid
        try:
            with self.db.session() as session:
                current = find_instance(session, uid)
                if current is None:  # removed meanwhile: index the new bytes after all
                    add_instance(session, attrs, location, source_ae=source_ae)
                else:
                    early = self._resolve_duplicate(attrs, location_of(current), sha256, source_ae)
                    if early is not None:
                        session.rollback()
                        self._discard(location)
                        return early
                    replace_location(session, current, location, attrs)
        except BaseException:
            self._discard(location)
            raise
        log.warning(
            "overwrote SOP instance %s from %r: sha256 %s replaces %s (old bytes kept, see superseded_objects)",
            uid, source_ae, sha256, existing.sha256 if existing else "?",
        )
        return self._result(StoreOutcome.OVERWRITTEN, attrs, location)

    def _resolve_duplicate(
        self, attrs: InstanceAttributes, existing: Location, sha256: str, source_ae: str
    ) -> StoreResult | None:
        """The result for a UID already indexed, or None when the new bytes must be written."""
        if existing.sha256 == sha256:
            log.info("SOP instance %s from %r: identical re-send, nothing to do", attrs.sop_instance_uid, source_ae)
            return self._result(StoreOutcome.DUPLICATE, attrs, existing)
        policy = self.settings.duplicate_policy
        if policy is DuplicatePolicy.KEEP_FIRST:
            log.warning(
                "SOP instance %s from %r arrived again with different bytes (sha256 %s, stored %s): kept the first",
                attrs.sop_instance_uid, source_ae, sha256, existing.sha256,
            )
            return self._result(StoreOutcome.KEPT_EXISTING, attrs, existing)
        if policy is DuplicatePolicy.REJECT:
            log.warning(
                "SOP instance %s from %r arrived again with different bytes: rejected", attrs.sop_instance_uid, source_ae
            )
            raise DuplicateConflict(
                f"SOP instance {attrs.sop_instance_uid} is already stored with different content "
                f"(sha256 {existing.sha256}, got {sha256}); storage.duplicate_policy=reject"
            )
        return None

    def _discard(self, location: Location) -> None:
        """Remove bytes written for an object that was not indexed after all.

        A landing file is deleted; a record appended to a pack stays there,
        unreferenced, until the pack is rewritten.
        """
        try:
            self.objects.delete(location)
        except Exception as exc:  # the landing sweeper will find it unreferenced
            log.warning("could not remove unindexed object %s: %s", location.container, exc)

    @staticmethod
    def _result(outcome: StoreOutcome, attrs: InstanceAttributes, location: Location) -> StoreResult:
        return StoreResult(
            outcome=outcome,
            sop_instance_uid=attrs.sop_instance_uid,
            sop_class_uid=attrs.sop_class_uid,
            study_instance_uid=attrs.study_instance_uid,
            series_instance_uid=attrs.series_instance_uid,
            transfer_syntax_uid=attrs.transfer_syntax_uid,
            location=location,
        )


class _open:
    """Context manager giving (seekable file, size, display name) for any source."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._owned: BinaryIO | None = None

    def __enter__(self) -> tuple[BinaryIO, int, str]:
        src = self.source
        if isinstance(src, (bytes, bytearray, memoryview)):
            return io.BytesIO(src), len(src), "<bytes>"
        if isinstance(src, (str, os.PathLike)):
            path = Path(src)
            try:
                self._owned = open(path, "rb")
            except OSError as exc:
                raise InvalidObject(f"{path}: cannot open: {exc.strerror}") from exc
            return self._owned, os.fstat(self._owned.fileno()).st_size, str(path)
        src.seek(0, os.SEEK_END)
        size = src.tell()
        src.seek(0)
        return src, size, getattr(src, "name", "<stream>")

    def __exit__(self, *exc_info: object) -> None:
        if self._owned is not None:
            self._owned.close()


def _chunks(fp: BinaryIO) -> Iterator[bytes | memoryview]:
    """The whole object, in chunks of at most CHUNK bytes: views of an in-memory source, no copies."""
    if isinstance(fp, BufferChain):
        yield from _sliced(fp.views())
        return
    if type(fp) is io.BytesIO:  # a subclass may define its own reads
        with fp.getbuffer() as view:
            yield from _sliced([view])
        return
    fp.seek(0)
    while chunk := fp.read(CHUNK):
        yield chunk


def _sliced(views: list[memoryview]) -> Iterator[memoryview]:
    for view in views:
        for start in range(0, len(view), CHUNK):
            yield view[start:start + CHUNK]


def _digest(fp: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(fp):
        digest.update(chunk)
    return digest.hexdigest()


__all__ = ["BufferChain", "IngestService", "ReceivedFile", "StoreOutcome", "StoreResult"]
