"""The composition root: wire storage, index and ingest once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pacs.errors import IndexUnavailable
from pacs.index.database import Database
from pacs.index.repository import record_open_pack, record_sealed_pack
from pacs.ingest.recovery import recover_open_packs
from pacs.ingest.service import IngestService
from pacs.settings import Settings
from pacs.storage import ObjectStore, open_blob_store
from pacs.storage.local import LocalBlobStore
from pacs.storage.packs import PackPool
from pacs.storage.compaction import Compactor

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    objects: ObjectStore
    compactor: Compactor
    ingest: IngestService

    def close(self) -> None:
        self.compactor.wait()
        if self.objects.packs is not None:
            self.objects.packs.close()
        self.objects.blobs.close()
        self.db.dispose()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def build_services(settings: Settings, *, migrate: bool = True) -> Services:
    """Open the store and the index the settings name.

    With ``migrate`` (the default), an index that is behind the code is
    upgraded first — the embedded default must work on first use.  Cluster
    operators who migrate explicitly pass ``migrate=False`` and get a clear
    error instead.
    """
    from pacs.index import migrate as migrations

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database.from_settings(settings)
    try:
        if not migrations.is_current(db):
            if not migrate:
                raise IndexUnavailable(
                    f"the index at {db.describe()} is not at the current schema; run `pacs db upgrade`"
                )
            log.info("upgrading the index schema at %s", db.describe())
            migrations.upgrade(db)
    except IndexUnavailable:
        db.dispose()
        raise
    except Exception as exc:
        db.dispose()
        raise IndexUnavailable(f"cannot open the index at {db.describe()}: {exc}") from exc
    objects = ObjectStore(open_blob_store(settings))
    objects.packs = _pack_pool(settings, objects, db)
    # Local packs can be walked for what the index lost in a crash of the machine
    # (a writer's lock tells an abandoned pack), so ingest need not flush SQLite's log.
    recoverable = objects.packs is not None and isinstance(objects.blobs, LocalBlobStore)
    if recoverable:
        try:
            recover_open_packs(objects, db)
        except BaseException:
            objects.blobs.close()
            db.dispose()
            raise
    compactor = Compactor(objects, db, settings.storage)
    ingest = IngestService(objects, db, settings.storage, compactor, recoverable_appends=recoverable)
    return Services(settings=settings, db=db, objects=objects, compactor=compactor, ingest=ingest)


def _pack_pool(settings: Settings, objects: ObjectStore, db: Database) -> PackPool | None:
    """Append-only packs for ingest, where the settings and the backend allow them."""
    if not settings.storage.uses_append_packs:
        return None

    def opened(path: str) -> None:
        with db.session() as session:
            record_open_pack(session, path)

    def sealed(path: str, size_bytes: int, object_count: int) -> None:
        with db.session() as session:
            record_sealed_pack(session, path, size_bytes, object_count)

    return PackPool(objects.blobs, target_bytes=settings.storage.pack_target_mb << 20,
                    idle_seal_s=settings.storage.pack_idle_seal_s, on_open=opened, on_seal=sealed)
