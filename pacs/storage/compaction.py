"""Compaction: copy landed objects into pack files and switch the index atomically.

The landing area holds one file per recently stored object.  Compaction keeps
it bounded:

1. take the ``compaction`` lease (one compactor at a time across processes);
2. pick landed instances, ordered by series and instance number so that a
   series reads back sequentially, up to ``pack_target_mb`` of bytes;
3. record the pack as WRITING, write it (each object re-verified against its
   checksum) and close it — it is now durable but referenced by nothing;
4. in one transaction, point every picked instance row at its record in the
   pack (only rows still pointing at the landing file they were picked with)
   and mark the pack SEALED;
5. delete the landing files of the rows switched.

A crash before 4 leaves a WRITING pack that the next run deletes; a crash
between 4 and 5 leaves landing files no row references, which the sweep of
unreferenced landing files (older than ``ORPHAN_AGE``) removes.  At no point
is an object reachable only through a file that might be removed.

Bound: ingest never lets more than ``landing_max_files`` instances wait in the
landing area — past that, the storing thread compacts before it returns — so
the files on the store are at most ``landing_max_files`` landing files plus
one pack per ``pack_target_mb`` of data.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta, timezone

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from pacs.errors import ChecksumMismatch, IndexUnavailable, NotFound, StorageUnavailable
from pacs.index.database import Database
from pacs.index.models import Container, ContainerState, Instance, Lease, SupersededObject, utcnow
from pacs.index.repository import LOCATION_COLUMNS, landing_totals, location_of, oldest_landing
from pacs.settings import StorageSettings
from pacs.storage.objects import LANDING_PREFIX, Location, ObjectStore, landed_at
from pacs.storage.packs import new_pack_path

log = logging.getLogger(__name__)

LEASE_NAME = "compaction"
LEASE_SECONDS = 600
ORPHAN_AGE = timedelta(hours=1)
BATCH_ROWS = 5000


@dataclass
class CompactionReport:
    packs_written: int = 0
    objects_packed: int = 0
    bytes_packed: int = 0
    landing_files_removed: int = 0
    abandoned_packs_removed: int = 0
    orphans_removed: int = 0
    unreadable: list[str] = field(default_factory=list)
    # Why the last pack could not be written (the store went away): compaction stopped, nothing moved.
    write_failed: str | None = None


class Compactor:
    def __init__(self, objects: ObjectStore, db: Database, settings: StorageSettings) -> None:
        self.objects = objects
        self.db = db
        self.settings = settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._running = threading.Lock()
        self._background: threading.Thread | None = None
        self._since_check = 0
        self._last_check = 0.0
        self._last_count = 0

    # ---- triggering -------------------------------------------------------

    def after_store(self) -> None:
        """Called by ingest after each new object; compacts when the landing area is full.

        Cheap: the index is asked for the landing count once a second, or
        sooner when this process's own stores since the last count could
        have reached a threshold.  At ``landing_max_files`` the caller
        compacts in its own thread before it returns (back-pressure); at
        ``landing_compact_at`` a background thread does.
        """
        self._since_check += 1
        now = time.monotonic()
        estimate = self._last_count + self._since_check
        threshold = min(self.settings.landing_compact_at, self.settings.landing_max_files)
        if estimate < threshold and now - self._last_check < 1.0:
            return
        if (
            estimate < self.settings.landing_max_files
            and now - self._last_check < 1.0
            and self._background is not None
            and self._background.is_alive()
        ):
            return
        try:
            with self.db.session() as session:
                landing, landing_bytes = landing_totals(session)
        except IndexUnavailable as exc:
            # The object that triggered this is stored and indexed already: a
            # count that failed (the index went away just after its commit)
            # must not turn that success into a failure.  The next store counts.
            log.warning("could not count the landing area after a store: %s", exc)
            return
        self._since_check = 0
        self._last_check = now
        self._last_count = landing
        if landing >= self.settings.landing_max_files:
            log.info("landing area holds %d objects (limit %d): compacting before accepting more",
                     landing, self.settings.landing_max_files)
            try:
                self.compact(wait_for_lease=True)
            except Exception:
                # The object that triggered this is stored and indexed already:
                # a failed compaction must not turn its success into a failure.
                log.exception("compaction failed; landed objects stay readable where they are")
            self._last_count = 0
            self._last_check = 0.0
        elif landing >= self.settings.landing_compact_at or landing_bytes >= self._pack_bytes:
            self.compact_in_background()

    def compact_in_background(self) -> None:
        with self._lock:
            if self._background is not None and self._background.is_alive():
                return
            self._background = threading.Thread(target=self._run_quietly, name="compactor", daemon=True)
            self._background.start()

    def _run_quietly(self) -> None:
        try:
            self.compact()
        except Exception:
            log.exception("background compaction failed; landed objects stay readable where they are")

    def wait(self) -> None:
        """Wait for a background compaction of this process to end."""
        thread = self._background
        if thread is not None:
            thread.join()

    # ---- the work ---------------------------------------------------------

    def compact(self, *, force: bool = False, wait_for_lease: bool = False) -> CompactionReport:
        """Pack landed objects while there are enough of them (all of them with ``force``)."""
        report = CompactionReport()
        # One compaction per process at a time (the background thread and a
        # storing thread under back-pressure share the lease holder name) ...
        if not self._running.acquire(blocking=wait_for_lease, timeout=LEASE_SECONDS if wait_for_lease else -1):
            return report
        try:
            return self._compact_holding_lock(report, force=force, wait_for_lease=wait_for_lease)
        finally:
            self._running.release()

    def _compact_holding_lock(self, report: CompactionReport, *, force: bool, wait_for_lease: bool) -> CompactionReport:
        # ... and one across processes, through the lease row.
        deadline = time.monotonic() + LEASE_SECONDS
        while not self._acquire_lease():
            if not wait_for_lease or time.monotonic() > deadline:
                return report
            time.sleep(0.2)
        try:
            self._remove_abandoned_packs(report)
            while self._worth_packing(force):
                if not self._pack_once(report):
                    break
                self._acquire_lease()  # renew
            self._remove_orphans(report)
        finally:
            self._release_lease()
        report.unreadable = list(dict.fromkeys(report.unreadable))  # once each, in order
        if report.packs_written:
            log.info(
                "compaction: %d objects (%.1f MB) into %d packs, %d landing files removed",
                report.objects_packed, report.bytes_packed / 1e6, report.packs_written,
                report.landing_files_removed,
            )
        return report

    @property
    def _pack_bytes(self) -> int:
        return self.settings.pack_target_mb << 20

    def _worth_packing(self, force: bool) -> bool:
        """Pack when a full pack's worth of bytes waits, or many objects, or old ones."""
        with self.db.session() as session:
            landing, landing_bytes = landing_totals(session)
            oldest = oldest_landing(session)
        if landing == 0:
            return False
        if force or landing >= self.settings.landing_compact_at or landing_bytes >= self._pack_bytes:
            return True
        if oldest is not None:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=timezone.utc)
            return utcnow() - oldest > timedelta(seconds=self.settings.landing_max_age_s)
        return False

    def _pick(self) -> list[tuple[int, Location]]:
        target = self.settings.pack_target_mb << 20
        picked: list[tuple[int, Location]] = []
        total = 0
        with self.db.session() as session:
            rows = session.execute(
                select(Instance.id, *LOCATION_COLUMNS)
                .where(Instance.packed.is_(False))
                .order_by(Instance.series_fk, Instance.instance_number, Instance.id)
                .limit(BATCH_ROWS)
            ).all()
        for row in rows:
            if picked and total + row.length > target:
                break
            picked.append((row.id, location_of(row)))
            total += row.length
        return picked

    def _pack_once(self, report: CompactionReport) -> bool:
        picked = self._pick()
        if not picked:
            return False
        readable: list[tuple[int, Location]] = []
        for pk, location in picked:
            if self.objects.blobs.exists(location.container):
                readable.append((pk, location))
            else:
                report.unreadable.append(location.container)
                log.error("landed object %s of instance row %d is missing; left in place", location.container, pk)
        if not readable:
            return False
        # The pack's row is recorded (WRITING) before its file exists, so that a pack
        # a crash or a failed write leaves behind is found and removed later.
        path = new_pack_path()
        with self.db.session() as session:
            pending = Container(path=path, state=ContainerState.WRITING, created_at=utcnow())
            session.add(pending)
            session.flush()
            container_pk = pending.id
        try:
            path, placed = self.objects.write_pack(((str(pk), loc) for pk, loc in readable), path)
        except ChecksumMismatch as exc:
            report.unreadable.append(str(exc))
            log.error("compaction stopped: a landed object fails its checksum: %s", exc)
            self._abandon(container_pk, path)
            return False
        except StorageUnavailable as exc:
            # A DataNode gone in the middle of the pack, say: nothing was switched, the landed
            # objects stay readable where they are, and the next compaction tries again.
            report.write_failed = str(exc)
            log.warning("compaction stopped: the pack could not be written (landed objects stay where they are): %s",
                        exc)
            self._abandon(container_pk, path)
            return False
        if not placed:  # every picked object was unreadable: nothing to switch
            self._abandon(container_pk, path)
            report.unreadable.extend(loc.container for _pk, loc in readable)
            return False
        switched: list[Location] = []
        with self.db.session() as session:
            for pk, old in readable:
                new = placed.get(str(pk))
                if new is None:  # unreadable or gone: it stays where it is
                    report.unreadable.append(old.container)
                    continue
                result = session.execute(
                    update(Instance)
                    .where(Instance.id == pk, Instance.container == old.container, Instance.packed.is_(False))
                    .values(container=new.container, offset=new.offset, xxh3=new.xxh3, packed=True)
                )
                if result.rowcount == 1:
                    switched.append(old)
            session.execute(
                update(Container)
                .where(Container.id == container_pk)
                .values(
                    state=ContainerState.SEALED,
                    size_bytes=sum(loc.length for loc in placed.values()),
                    object_count=len(placed),
                    sealed_at=utcnow(),
                )
            )
        for old in switched:
            try:
                if self.objects.delete(old):
                    report.landing_files_removed += 1
            except Exception as exc:
                log.warning("could not remove landing file %s (the orphan sweep will): %s", old.container, exc)
        report.packs_written += 1
        report.objects_packed += len(switched)
        report.bytes_packed += sum(loc.length for loc in switched)
        return bool(switched)  # nothing switched: the rest cannot be packed now, stop

    def _abandon(self, container_pk: int, path: str) -> None:
        """Remove a pack no row points to, and its row; if the file cannot go now, the row stays for the sweep."""
        try:
            self.objects.blobs.delete(path)
        except NotFound:
            pass
        except Exception as exc:  # noqa: BLE001 - the store may be the thing that failed
            log.warning("could not remove unfinished pack %s now (the next compaction will): %s", path, exc)
            return
        with self.db.session() as session:
            session.execute(delete(Container).where(Container.id == container_pk))

    def _remove_abandoned_packs(self, report: CompactionReport) -> None:
        """Delete packs a crashed compactor left in state WRITING (no row references them)."""
        with self.db.session() as session:
            rows = session.execute(
                select(Container.id, Container.path).where(Container.state == ContainerState.WRITING)
            ).all()
        for pk, path in rows:
            with self.db.session() as session:
                referenced = session.scalar(select(Instance.id).where(Instance.container == path).limit(1))
                if referenced is not None:  # switched but not marked sealed: seal it
                    session.execute(update(Container).where(Container.id == pk).values(state=ContainerState.SEALED))
                    continue
                if not path.startswith("pending:"):
                    try:
                        self.objects.blobs.delete(path)
                    except NotFound:
                        pass
                session.execute(delete(Container).where(Container.id == pk))
            report.abandoned_packs_removed += 1
            log.warning("removed pack %s left unfinished by an earlier compaction", path)

    def _remove_orphans(self, report: CompactionReport) -> None:
        """Delete landing files older than ORPHAN_AGE that no index row references."""
        cutoff = time.time() - ORPHAN_AGE.total_seconds()
        candidates = []
        for info in self.objects.blobs.list(LANDING_PREFIX.rstrip("/")):
            candidates.append(info.path)
        if not candidates:
            return
        with self.db.session() as session:
            referenced = set(
                session.scalars(select(Instance.container).where(Instance.packed.is_(False))).all()
            ) | set(
                session.scalars(
                    select(SupersededObject.container).where(SupersededObject.container.like(LANDING_PREFIX + "%"))
                ).all()
            )
        for path in candidates:
            if path in referenced or not _older_than(path, cutoff):
                continue
            self.objects.blobs.delete(path)
            report.orphans_removed += 1
            log.info("removed unreferenced landing file %s", path)

    # ---- the lease --------------------------------------------------------

    def _acquire_lease(self) -> bool:
        now = utcnow()
        expires = now + timedelta(seconds=LEASE_SECONDS)
        try:
            with self.db.session() as session:
                result = session.execute(
                    update(Lease)
                    .where(Lease.name == LEASE_NAME)
                    .where((Lease.holder == self.holder) | (Lease.expires_at < now))
                    .values(holder=self.holder, expires_at=expires)
                )
                if result.rowcount == 1:
                    return True
                exists = session.scalar(select(Lease.name).where(Lease.name == LEASE_NAME))
                if exists is not None:
                    return False
                session.add(Lease(name=LEASE_NAME, holder=self.holder, expires_at=expires))
            return True
        except IntegrityError:
            return False  # another process created the lease row first

    def _release_lease(self) -> None:
        with self.db.session() as session:
            session.execute(delete(Lease).where(Lease.name == LEASE_NAME, Lease.holder == self.holder))


def _older_than(path: str, cutoff: float) -> bool:
    landed = landed_at(path)
    return landed is not None and landed.timestamp() < cutoff
