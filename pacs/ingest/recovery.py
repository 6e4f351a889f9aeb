"""Index again what a crash of the machine took out of the index, from the packs.

On the embedded default (local packs, SQLite), ingest commits an instance's
row without flushing SQLite's log (``Database.transaction(flush_commit=False)``)
once the object's record is ``fdatasync``'ed in its pack.  The record is the
durable copy: it holds the object's bytes and their SHA-256, which is all the
row is made from.  A crash of the process loses nothing; a crash of the
machine can lose the last commits, and this module makes them again:

* every pack still ``open`` in ``containers`` whose writer is gone (its lock,
  see ``LocalAppendFile``, is free: the process closed it or died) is walked
  record by record;
* a record that no instance points at, whose bytes match their checksum and
  whose SOP Instance UID is not indexed, is indexed where it lies (one
  transaction each, flushed);
* the pack is cut after its last whole record (what follows is zeros its
  writer wrote ahead, or a torn record) and recorded ``sealed``: nothing
  appends to it again.

It runs when the services are built (``pacs serve``, ``pacs import``, ...),
before anything is stored.  Packs whose writer is alive are left alone, so it
is safe beside other processes of the same archive.

What it can also index: a record whose store failed after it was written
(the index was unreachable), which the sender was told had failed.  Indexing
it is what the sender's retry would have done; the retry is then an
identical re-send (a no-op success).  The archive has no instance deletion;
one would have to leave a tombstone for this scan.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field, replace

import xxhash

from pacs.errors import ChecksumMismatch, InvalidObject, NotFound, StorageUnavailable
from pacs.index.database import Database
from pacs.index.repository import (
    add_instance,
    find_location,
    open_packs,
    pack_is_open,
    record_sealed_pack,
    referenced_offsets,
)
from pacs.ingest.parse import read_attributes
from pacs.storage.local import AbandonedFile, LocalBlobStore
from pacs.storage.objects import Location, ObjectStore, read_pack_records

log = logging.getLogger(__name__)

RECOVERED_AE = ""  # the calling AE is not in the record


@dataclass
class Recovery:
    """What :func:`recover_open_packs` did."""

    packs_sealed: list[str] = field(default_factory=list)
    packs_in_use: int = 0
    indexed: list[str] = field(default_factory=list)  # SOP Instance UIDs
    skipped: int = 0  # unreferenced records left alone (UID indexed elsewhere, bad checksum)
    damaged: list[str] = field(default_factory=list)  # packs whose walk stopped at damage, left open


def recover_open_packs(objects: ObjectStore, db: Database) -> Recovery:
    """Index the unreferenced records of abandoned open packs and seal them (local packs only)."""
    done = Recovery()
    blobs = objects.blobs
    if not isinstance(blobs, LocalBlobStore):
        return done
    with db.session() as session:
        paths = open_packs(session)
    for path in paths:
        try:
            claim = blobs.claim_abandoned(path)
        except NotFound:
            continue  # recorded, not created yet (or its creation failed)
        if claim is None:
            done.packs_in_use += 1
            continue
        with claim:
            try:
                _recover(objects, db, path, claim, done)
            except (ChecksumMismatch, StorageUnavailable) as exc:
                # What was indexed before the damage stays indexed; the pack stays
                # open, so the next start walks it again (and an operator can look).
                done.damaged.append(path)
                log.error("could not walk open pack %s to the end, left open: %s", path, exc)
    if done.indexed or done.packs_sealed or done.damaged:
        log.log(
            logging.WARNING if done.indexed or done.damaged else logging.INFO,
            "open packs of stopped writers: %d sealed, %d damaged (left open), %d still in use; "
            "indexed %d stored instance(s) whose rows a crash had lost, left %d unreferenced record(s) alone",
            len(done.packs_sealed), len(done.damaged), done.packs_in_use, len(done.indexed), done.skipped,
        )
    return done


def _recover(objects: ObjectStore, db: Database, path: str, claim: AbandonedFile, done: Recovery) -> None:
    with db.session() as session:
        if not pack_is_open(session, path):
            return  # sealed by its writer, or by another recovery, since the listing
        referenced = referenced_offsets(session, path)
    count = end = 0
    for record in read_pack_records(objects.blobs, path):
        count += 1
        end = record.offset + record.length
        if record.offset not in referenced:
            uid = _index_record(objects, db, record)
            if uid is None:
                done.skipped += 1
            else:
                done.indexed.append(uid)
    claim.truncate(end)
    with db.session() as session:
        record_sealed_pack(session, path, end, count)
    done.packs_sealed.append(path)
    log.info("recovered pack %s: %d records, sealed", path, count)


def _index_record(objects: ObjectStore, db: Database, record: Location) -> str | None:
    """Index one unreferenced record; its SOP Instance UID, or None when it is left alone."""
    try:
        data = objects.get(record)
    except ChecksumMismatch as exc:
        log.warning("unreferenced record left alone: %s", exc)
        return None
    try:
        attrs = read_attributes(io.BytesIO(data), len(data))
    except InvalidObject as exc:
        log.warning("unreferenced record %s@%d left alone: %s", record.container, record.offset, exc)
        return None
    uid = attrs.sop_instance_uid
    with db.transaction() as conn:
        if find_location(conn, uid) is not None:
            log.info("unreferenced record %s@%d: SOP instance %s is indexed elsewhere, left alone",
                     record.container, record.offset, uid)
            return None
        # the record header holds the SHA-256 (checked by the read above); the row also gets the XXH3-64 reads verify
        located = replace(record, xxh3=xxhash.xxh3_64_hexdigest(data))
        if add_instance(conn, attrs, located, source_ae=RECOVERED_AE) is None:
            return None
    log.info("indexed SOP instance %s from %s@%d", uid, record.container, record.offset)
    return uid


__all__ = ["Recovery", "recover_open_packs"]
