"""Scrub: read every indexed object back and compare it with its checksums.

Reads verify an object's XXH3-64 (``pacs.storage.objects``); the scrub
recomputes the SHA-256, the object's identity, and checks that the XXH3-64
the index holds is the bytes' own, so a row whose read checksum went bad is
reported before a retrieve trips on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash
from sqlalchemy import func, select

from pacs.errors import PacsError
from pacs.index.database import Database
from pacs.index.models import Instance
from pacs.storage.objects import Location, ObjectStore


@dataclass
class ScrubReport:
    checked: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)


def scrub(
    db: Database,
    objects: ObjectStore,
    *,
    batch: int = 1000,
    on_progress: Callable[[int, int], None] | None = None,
) -> ScrubReport:
    """Verify every instance's bytes; report (SOP Instance UID, problem) pairs."""
    report = ScrubReport()
    with db.session() as session:
        total = session.scalar(select(func.count()).select_from(Instance)) or 0
    last_id = 0
    while True:
        with db.session() as session:
            rows = session.execute(
                select(Instance.id, Instance.sop_instance_uid, Instance.container, Instance.offset,
                       Instance.length, Instance.sha256, Instance.xxh3)
                .where(Instance.id > last_id).order_by(Instance.id).limit(batch)
            ).all()
        if not rows:
            break
        locations = (Location(row.container, row.offset, row.length, row.sha256) for row in rows)
        for row, result in zip(rows, objects.read_many(locations)):  # a span of a pack per read
            if isinstance(result, PacsError):
                report.problems.append((row.sop_instance_uid, str(result)))
            elif row.xxh3 is not None and xxhash.xxh3_64_hexdigest(result) != row.xxh3:
                report.problems.append((row.sop_instance_uid, f"{row.container}@{row.offset}+{row.length}: the bytes"
                                        f" match their sha256, not the xxh3 {row.xxh3} the index holds"))
            report.checked += 1
            last_id = row.id
        if on_progress:
            on_progress(report.checked, total)
    return report
