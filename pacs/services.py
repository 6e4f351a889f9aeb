"""The composition root: wire storage, index and ingest once per process."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pacs.errors import IndexUnavailable
from pacs.index.database import Database
from pacs.ingest.service import IngestService
from pacs.settings import Settings
from pacs.storage import ObjectStore, open_blob_store
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
    compactor = Compactor(objects, db, settings.storage)
    ingest = IngestService(objects, db, settings.storage, compactor)
    return Services(settings=settings, db=db, objects=objects, compactor=compactor, ingest=ingest)
