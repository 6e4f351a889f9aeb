"""The archive as a DICOM client: C-ECHO and pushing stored instances (C-STORE SCU).

Used by ``pacs echo`` and ``pacs push`` so operators can test routes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pynetdicom import build_context
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from pacs.errors import NotFound, PacsError
from pacs.index.models import Instance, Series, Study
from pacs.index.repository import LOCATION_COLUMNS, location_of
from pacs.net.reactor import EventDrivenAE
from pacs.net.stored import StoredObject
from pacs.net.transport import REQUESTOR_HANDLERS
from pacs.services import Services

log = logging.getLogger(__name__)


def echo(host: str, port: int, *, called_ae: str, calling_ae: str, timeout_s: float = 10) -> int:
    """C-ECHO a peer; return the status (0 = success), or raise ConnectionError."""
    ae = EventDrivenAE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=REQUESTOR_HANDLERS)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae} at {host}:{port} (rejected, aborted or unreachable)")
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise ConnectionError(f"{called_ae} at {host}:{port} did not answer the C-ECHO")
        return int(status.Status)
    finally:
        assoc.release()


@dataclass
class PushReport:
    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def push(
    services: Services,
    host: str,
    port: int,
    *,
    called_ae: str,
    study_instance_uid: str,
    series_instance_uid: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PushReport:
    """Send the stored instances of a study (or one series) to a peer, as stored."""
    query = (
        select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid,
               *LOCATION_COLUMNS)
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
        .where(Study.study_instance_uid == study_instance_uid)
        .order_by(Series.series_number, Instance.instance_number, Instance.id)
    )
    if series_instance_uid:
        query = query.where(Series.series_instance_uid == series_instance_uid)
    with services.db.session() as session:
        rows = session.execute(query).all()
    if not rows:
        raise NotFound(f"no stored instances for study {study_instance_uid}"
                       + (f", series {series_instance_uid}" if series_instance_uid else ""))
    ae = EventDrivenAE(ae_title=services.settings.dicom.ae_title)
    ae.maximum_pdu_size = 0
    pairs = sorted({(r.sop_class_uid, r.transfer_syntax_uid) for r in rows})[:128]
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
    assoc = ae.associate(host, port, contexts=contexts, ae_title=called_ae,
                         evt_handlers=REQUESTOR_HANDLERS)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae} at {host}:{port} (rejected, aborted or unreachable)")
    report = PushReport()
    try:
        reads = services.objects.read_many(location_of(row) for row in rows)
        for number, (row, data) in enumerate(zip(rows, reads), 1):
            try:
                if isinstance(data, PacsError):
                    raise data
                stored = StoredObject(data, sop_class_uid=row.sop_class_uid,
                                      sop_instance_uid=row.sop_instance_uid,
                                      transfer_syntax_uid=row.transfer_syntax_uid)
                status = assoc.send_c_store(stored)
                code = int(status.Status) if "Status" in status else None
            except (PacsError, ValueError) as exc:
                report.failed.append((row.sop_instance_uid, str(exc)))
            else:
                if code is None:
                    report.failed.append((row.sop_instance_uid, "no response"))
                elif code == 0 or (code & 0xF000) == 0xB000:  # success or warning
                    report.sent += 1
                else:
                    report.failed.append((row.sop_instance_uid, f"status 0x{code:04X}"))
            if on_progress:
                on_progress(number, len(rows))
            if not assoc.is_established:
                raise ConnectionError(f"{called_ae} ended the association after {number} instances")
    finally:
        if assoc.is_established:
            assoc.release()
    return report
