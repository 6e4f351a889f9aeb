"""DICOM-agnostic object storage with checksums and container packing.

Objects go to *pack* files under ``packs/`` in one of two ways:

* straight in, where the blob store can append (the local filesystem): each
  object is appended to an open pack and flushed before ``put`` returns
  (:mod:`pacs.storage.packs`);
* through a *landing* file each under ``landing/`` (a create that is durable
  when it returns; HDFS), so acknowledging a store never waits for a batch.
  The compactor (:mod:`pacs.storage.compaction`) later copies landed objects
  into packs and switches their index rows in one transaction, which bounds
  the number of files the NameNode has to track.

A pack is a sequence of records, each a 48-byte header followed by the
object's original bytes::

    offset  size  field
    0       8     magic  b"PACSREC1"
    8       8     object length, unsigned little-endian
    16      32    SHA-256 of the object
    48      n     the object's bytes, as received

The index stores the offset of the object's first byte (past the header), so
a read is one range read; the headers make a pack self-describing, so the
index of a pack can be rebuilt from the pack alone.

Two checksums per object.  The SHA-256 is its identity: in the record
header, in the index, compared when a sender stores the same instance again.
Reads verify the XXH3-64 of the bytes that the index also holds (computed as
the object is written): 50 GB/s against SHA-256's 1.8 GB/s on one core of
the reference machine, so a retrieve of 256 MB spends 5 ms checking instead
of 0.14 s, with the same power to catch a flipped bit or a torn read.  An
object indexed without one (rows from before it was recorded, rebuilt from
packs) is verified by its SHA-256.  The scrub recomputes SHA-256s.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

import xxhash

from pacs.errors import ChecksumMismatch, NotFound, PacsError, StorageUnavailable
from pacs.storage.base import BlobStore
from pacs.storage.packs import PackPool, PendingAppend, new_pack_path

log = logging.getLogger(__name__)

RECORD_MAGIC = b"PACSREC1"
RECORD_HEADER = struct.Struct("<8sQ32s")
LANDING_PREFIX = "landing/"
READ_ATTEMPTS = 3


@dataclass(frozen=True)
class Location:
    """Where an object's bytes are: a byte range of a container file."""

    container: str
    offset: int
    length: int
    sha256: str
    xxh3: str | None = None  # hex XXH3-64 of the bytes, which reads verify; None: verify the SHA-256

    @property
    def is_landing(self) -> bool:
        return self.container.startswith(LANDING_PREFIX)

    def landed_at(self) -> datetime | None:
        """When a landed object was written, from its path (None for packed objects)."""
        return landed_at(self.container)


def landed_at(path: str) -> datetime | None:
    """The time a landing path records (``landing/YYYYMMDD/HHMMSS-<uuid>.dcm``), or None."""
    parts = path.split("/")
    if not path.startswith(LANDING_PREFIX) or len(parts) != 3:
        return None
    try:
        stamp = datetime.strptime(parts[1] + parts[2][:6], "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return stamp.replace(tzinfo=timezone.utc)


def _verify(location: Location, data: bytes | memoryview) -> None:
    name, digest, expected = _read_check(location)
    digest.update(data)
    _compare(location, name, digest, expected)


def _read_check(location: Location):  # noqa: ANN202 - (name, hash object, expected hex digest)
    """The checksum a read of ``location`` verifies: its XXH3-64 where the index has one, else its SHA-256."""
    if location.xxh3 is not None:
        return "xxh3", xxhash.xxh3_64(), location.xxh3
    return "sha256", hashlib.sha256(), location.sha256


def _compare(location: Location, name: str, digest, expected: str) -> None:  # noqa: ANN001 - a hash object
    got = digest.hexdigest()
    if got != expected:
        raise ChecksumMismatch(
            f"{location.container}@{location.offset}+{location.length}: expected {name} {expected}, got {got}"
        )


T = TypeVar("T")

# The largest gap between two objects still read as one span: the record
# header between them, or a few objects of another series.
SPAN_GAP = 64 << 10
# Spans are planned over runs of this many spans' worth of objects (ObjectStore.plan_spans).
SPAN_WINDOW = 2


@dataclass(frozen=True)
class Span:
    """Objects read with one range read: ``[start, end)`` of ``container`` holds them all.

    ``positions``: where each of ``locations`` stands in the sequence the
    span was planned from (:func:`plan_spans`).
    """

    container: str
    start: int
    end: int
    locations: tuple[Location, ...]
    positions: tuple[int, ...]

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_spans(locations: Iterable[Location], *, max_bytes: int, max_gap: int = SPAN_GAP,
               window: int = 0) -> Iterator[Span]:
    """Group locations into spans of objects close together in one container.

    A span grows while the next object starts at most ``max_gap`` bytes after
    the span's end and the span stays within ``max_bytes``; an object larger
    than ``max_bytes`` is a span of its own (with ``max_bytes=0``, every object).

    With ``window=0`` the objects are taken in their order. Otherwise each run
    of consecutive objects holding ``window`` bytes is taken in the order the
    objects lie in their containers: a series that several associations
    stored at once lies interleaved across the packs of the processes that
    served them, and in its own order would be read an object at a time. The
    spans of a run come in the order of their first position; put the objects
    back in order with :func:`in_planned_order`.
    """
    if window <= 0:
        yield from _group(enumerate(locations), max_bytes, max_gap)
        return
    run: list[tuple[int, Location]] = []
    size = 0
    for placed in enumerate(locations):
        run.append(placed)
        size += placed[1].length
        if size >= window:
            yield from _spans_of_run(run, max_bytes, max_gap)
            run, size = [], 0
    if run:
        yield from _spans_of_run(run, max_bytes, max_gap)


def _spans_of_run(run: list[tuple[int, Location]], max_bytes: int, max_gap: int) -> list[Span]:
    by_place = sorted(run, key=lambda placed: (placed[1].container, placed[1].offset))
    return sorted(_group(by_place, max_bytes, max_gap), key=lambda span: min(span.positions))


def _group(placed: Iterable[tuple[int, Location]], max_bytes: int, max_gap: int) -> Iterator[Span]:
    group: list[tuple[int, Location]] = []
    for position, location in placed:
        if group:
            first, last = group[0][1], group[-1][1]
            end = last.offset + last.length
            if (location.container == last.container
                    and 0 <= location.offset - end <= max_gap
                    and location.offset + location.length - first.offset <= max_bytes):
                group.append((position, location))
                continue
            yield _span(group)
        group = [(position, location)]
    if group:
        yield _span(group)


def _span(group: list[tuple[int, Location]]) -> Span:
    first, last = group[0][1], group[-1][1]
    return Span(first.container, first.offset, last.offset + last.length,
                tuple(location for _, location in group), tuple(position for position, _ in group))


def in_planned_order(read: Iterable[tuple[Span, list[T]]]) -> Iterator[T]:
    """The results of spans read in the order :func:`plan_spans` gave them, put back in the planned objects' order.

    Holds at most one run (``window`` bytes) of results that are not due yet.
    """
    waiting: dict[int, T] = {}
    due = 0
    for span, results in read:
        waiting.update(zip(span.positions, results))
        while due in waiting:
            yield waiting.pop(due)
            due += 1
    if waiting:
        raise RuntimeError(f"spans left objects {sorted(waiting)[:5]}... unread before them (from {due})")


class _Hashing:
    """Pass chunks through while counting them and taking their XXH3-64 (and, with ``sha256``, their SHA-256)."""

    def __init__(self, chunks: Iterable[bytes], *, sha256: bool = True) -> None:
        self._chunks = chunks
        self.digest = hashlib.sha256() if sha256 else None
        self.xxh3 = xxhash.xxh3_64()
        self.length = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.length += len(chunk)
            if self.digest is not None:
                self.digest.update(chunk)
            self.xxh3.update(chunk)
            yield chunk


class _Exactly:
    """Pass chunks through, failing unless they add up to ``length`` bytes (a record header promised that many)."""

    def __init__(self, chunks: Iterable[bytes], length: int) -> None:
        self._chunks = chunks
        self._length = length

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self._chunks:
            seen += len(chunk)
            if seen > self._length:
                raise ValueError(f"object longer than announced: expected {self._length} bytes, got more")
            yield chunk
        if seen != self._length:
            raise ValueError(f"object shorter than announced: expected {self._length} bytes, got {seen}")


class PendingPut:
    """An object written whose flush may still be under way (see :meth:`ObjectStore.begin_put`).

    ``location`` is where it is; :meth:`wait` returns once it is durable, and
    nothing may point at it before that.  :meth:`release` (or leaving the
    ``with`` block) gives its pack back, and must come last, also when the
    caller gives up on the object: a caller indexing the object commits
    between the two.
    """

    def __init__(self, location: Location, append: PendingAppend | None = None) -> None:
        self.location = location
        self._append = append

    def wait(self) -> None:
        if self._append is not None:
            self._append.wait()

    def release(self) -> None:
        if self._append is not None:
            self._append.release()

    def __enter__(self) -> PendingPut:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class ObjectStore:
    """put / get / get_range / exists / checksum / delete of whole objects.

    With ``packs`` (a :class:`PackPool` on a blob store that can append),
    ``put`` appends to a pack; without, it writes a landing file.
    """

    def __init__(self, blobs: BlobStore, packs: PackPool | None = None) -> None:
        self.blobs = blobs
        self.packs = packs

    @property
    def description(self) -> str:
        return self.blobs.description

    def put(
        self, chunks: Iterable[bytes], *, sha256: str | None = None, verify: bool = True, length: int | None = None
    ) -> Location:
        """Write one object; return once it is durable.

        ``sha256`` is the caller's digest of the bytes and ``length`` their
        count.  With ``verify`` (or without a digest) the bytes are hashed
        again as they stream, which catches a source file rewritten under us;
        a caller whose bytes cannot change (a private in-memory copy) passes
        ``verify=False`` and the object is hashed once only.  An object goes
        into a pack only when digest and length are known before its first
        byte (the record header holds both); otherwise it lands.
        """
        with self.begin_put(chunks, sha256=sha256, verify=verify, length=length) as pending:
            pending.wait()
        return pending.location

    def begin_put(
        self, chunks: Iterable[bytes], *, sha256: str | None = None, verify: bool = True, length: int | None = None
    ) -> PendingPut:
        """:meth:`put`, returning as soon as the bytes are written (see :class:`PendingPut`).

        Only an append to a pack is left in flight; a landing file is
        durable when this returns.
        """
        if self.packs is not None and sha256 is not None and length is not None:
            return self._append(chunks, sha256, length, verify)
        now = datetime.now(timezone.utc)
        path = f"{LANDING_PREFIX}{now:%Y%m%d}/{now:%H%M%S}-{uuid.uuid4().hex}.dcm"
        if sha256 is not None and not verify:
            hashing = _Hashing(chunks, sha256=False)
            length = self.blobs.write(path, hashing)
            return PendingPut(Location(path, 0, length, sha256, hashing.xxh3.hexdigest()))
        hashing = _Hashing(chunks)
        self.blobs.write(path, hashing)
        digest = hashing.digest.hexdigest()
        if sha256 is not None and digest != sha256:
            self.blobs.delete(path)
            raise ChecksumMismatch(f"object changed while stored: expected sha256 {sha256}, got {digest}")
        return PendingPut(Location(path, 0, hashing.length, digest, hashing.xxh3.hexdigest()))

    def _append(self, chunks: Iterable[bytes], sha256: str, length: int, verify: bool) -> PendingPut:
        header = RECORD_HEADER.pack(RECORD_MAGIC, length, bytes.fromhex(sha256))
        hashing = _Hashing(_Exactly(chunks, length), sha256=verify)
        try:
            pending = self.packs.begin_append(header, hashing)
        except ValueError as exc:
            raise ChecksumMismatch(f"object changed while stored: {exc}") from exc
        if hashing.digest is not None and hashing.digest.hexdigest() != sha256:
            pending.release()  # the record is flushed, but nothing will reference it
            raise ChecksumMismatch(
                f"object changed while stored: expected sha256 {sha256}, got {hashing.digest.hexdigest()}"
            )
        location = Location(pending.path, pending.start + RECORD_HEADER.size, length, sha256, hashing.xxh3.hexdigest())
        return PendingPut(location, pending)

    def get(self, location: Location, *, verify: bool = True) -> bytes:
        """The object's bytes; raise :class:`ChecksumMismatch` if they are not what was stored.

        A read that fails on the store is tried again (three times in all): a
        DataNode that just died can fail a read until its replicas are avoided.
        """
        if not verify:
            return self._read(location.container, location.offset, location.length)
        data = self._read(location.container, location.offset, location.length, unverified=True)
        try:
            _verify(location, data)
        except ChecksumMismatch:
            return self._get_checked(location)
        return data if isinstance(data, bytes) else bytes(data)

    def _get_checked(self, location: Location) -> bytes:
        """The object read again through the store's checked path (on HDFS, hdfs-native's CRCs and
        replica choice), after bytes read without it did not match the object's checksum."""
        data = self._read(location.container, location.offset, location.length)
        _verify(location, data)
        log.warning("%s@%d+%d: a read did not match its checksum, a second through the store's checked client did"
                    " (a corrupt replica?)", location.container, location.offset, location.length)
        return data

    def _read(self, container: str, offset: int, length: int, *, unverified: bool = False) -> bytes | bytearray:
        read = self.blobs.read_unverified if unverified else self.blobs.read
        for attempt in range(READ_ATTEMPTS):
            try:
                return read(container, offset, length)
            except StorageUnavailable:
                if attempt == READ_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def plan_spans(self, locations: Iterable[Location]) -> Iterator[Span]:
        """:func:`plan_spans` with the blob store's span size (``BlobStore.span_bytes``), over runs of twice that."""
        span_bytes = self.blobs.span_bytes
        return plan_spans(locations, max_bytes=span_bytes, window=SPAN_WINDOW * span_bytes)

    def read_span(self, span: Span, *, views: bool = False) -> list[bytes | memoryview | PacsError]:
        """The verified bytes of each object of ``span``, in its order, or the error that object met.

        ``views``: an object of a span read whole comes as a view of the span's
        buffer instead of a copy (for a retrieve, which sends and drops it).

        One range read for the whole span (``BlobStore.read_unverified``: on
        HDFS, straight from a DataNode). An object whose checksum does not
        match is read again through the store's checked path; if the span
        cannot be read, each object is read on its own (:meth:`get`). So a
        bad replica or an unreadable object fails alone, if at all.
        """
        if len(span.locations) > 1:
            try:
                data = memoryview(self._read(span.container, span.start, span.end - span.start, unverified=True))
            except PacsError:
                pass
            else:
                results: list[bytes | PacsError] = []
                for location in span.locations:
                    piece = data[location.offset - span.start:location.offset - span.start + location.length]
                    if not views:
                        piece = bytes(piece)
                    try:
                        _verify(location, piece)
                    except ChecksumMismatch:
                        try:
                            piece = self._get_checked(location)
                        except PacsError as exc:
                            results.append(exc)
                            continue
                    results.append(piece)
                return results
        results = []
        for location in span.locations:
            try:
                results.append(self.get(location))
            except PacsError as exc:
                results.append(exc)
        return results

    def read_many(self, locations: Iterable[Location]) -> Iterator[bytes | PacsError]:
        """Each object's verified bytes, or the error reading it, in order; read a span at a time."""
        return in_planned_order((span, self.read_span(span)) for span in self.plan_spans(locations))

    def get_many(self, locations: Iterable[Location]) -> Iterator[bytes]:
        """:meth:`read_many`, raising at the first object that cannot be read."""
        for result in self.read_many(locations):
            if isinstance(result, PacsError):
                raise result
            yield result

    def iter_get(self, location: Location, *, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        """Stream the object; the checksum is verified when the last chunk has been read."""
        name, digest, expected = _read_check(location)
        for chunk in self.blobs.iter_read(
            location.container, location.offset, location.length, chunk_size
        ):
            digest.update(chunk)
            yield chunk
        _compare(location, name, digest, expected)

    def get_range(self, location: Location, offset: int, length: int) -> bytes:
        """A byte range of the object (not verified: verification needs the whole object)."""
        if offset < 0 or length < 0 or offset + length > location.length:
            raise ValueError(
                f"range {offset}+{length} outside an object of {location.length} bytes"
            )
        return self.blobs.read(location.container, location.offset + offset, length)

    def exists(self, location: Location) -> bool:
        return self.blobs.exists(location.container)

    def checksum(self, location: Location) -> str:
        """Recompute the SHA-256 of the stored bytes (for scrubbing)."""
        digest = hashlib.sha256()
        for chunk in self.blobs.iter_read(location.container, location.offset, location.length):
            digest.update(chunk)
        return digest.hexdigest()

    def delete(self, location: Location) -> bool:
        """Remove a landed object's file; return False for a packed object, which stays where it is.

        Packed objects are never removed one by one: their bytes go when the
        pack is rewritten without them.
        """
        if not location.is_landing:
            return False
        return self.blobs.delete(location.container)

    def write_pack(
        self, objects: Iterable[tuple[str, Location]], path: str | None = None
    ) -> tuple[str, dict[str, Location]]:
        """Copy objects into one new pack file; return its path and the new locations.

        ``objects`` pairs a caller's key with each object's current location;
        each object is read, verified and appended with its record header.
        An object whose file is gone, or whose bytes fail their checksum, is
        left out (and absent from the result).  ``path``: the new pack's
        (default: a fresh ``new_pack_path()``), for a caller that records it
        before writing.  The pack is durable when this returns.
        """
        path = path or new_pack_path()
        placed: dict[str, Location] = {}

        def records() -> Iterator[bytes]:
            offset = 0
            for key, location in objects:
                try:
                    data = self.get(location)
                except NotFound:
                    continue  # removed meanwhile (packed by another compactor): leave its row alone
                except ChecksumMismatch as exc:
                    log.error("not packing %s: %s", key, exc)  # stays in place for the scrub to report
                    continue
                header = RECORD_HEADER.pack(
                    RECORD_MAGIC, len(data), bytes.fromhex(location.sha256)
                )
                yield header
                offset += len(header)
                # get() checked the bytes against the XXH3-64 where the index had one
                xxh3 = location.xxh3 or xxhash.xxh3_64_hexdigest(data)
                placed[key] = Location(path, offset, len(data), location.sha256, xxh3)
                yield data
                offset += len(data)

        self.blobs.write(path, records())
        return path, placed


def read_pack_records(blobs: BlobStore, path: str) -> Iterator[Location]:
    """Walk a pack's record headers (to rebuild or check an index from the pack alone).

    A record cut short at the end of the pack — an append that a crash
    interrupted, which nothing references — ends the walk, and so do zeros
    where a header would start: the space a local pack that was still being
    appended to had written ahead (``pacs.storage.local.LocalAppendFile``).
    """
    size = blobs.size(path)
    offset = 0
    while offset < size:
        if offset + RECORD_HEADER.size > size:
            if any(blobs.read(path, offset, size - offset)):
                log.warning("%s: torn record header at %d (pack ends at %d), ignored", path, offset, size)
            return
        header = blobs.read(path, offset, RECORD_HEADER.size)
        if not any(header):
            return  # zeros written ahead of the next record
        magic, length, digest = RECORD_HEADER.unpack(header)
        if magic != RECORD_MAGIC:
            raise ChecksumMismatch(f"{path}@{offset}: bad record magic {magic!r}")
        offset += RECORD_HEADER.size
        if offset + length > size:
            log.warning("%s: torn record at %d (%d bytes announced, pack ends at %d), ignored", path, offset, length, size)
            return
        yield Location(path, offset, length, digest.hex())
        offset += length
