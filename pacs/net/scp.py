"""The archive's DICOM SCP: Verification and Storage (Query/Retrieve follow).

Handlers get the services they need bound as extra arguments (pynetdicom's
``evt_handlers`` tuples), never through globals.  C-STORE hands the received
bytes — exactly as they arrived, with the file meta pynetdicom prepends — to
the ingest service and answers only after the instance is durable and indexed.
"""

from __future__ import annotations

import logging
import socket

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status

from pacs.ingest.service import IngestService
from pacs.net.status import status_dataset, store_failure
from pacs.settings import Settings

log = logging.getLogger(__name__)


def handle_connection_open(event: evt.Event) -> None:
    # Without TCP_NODELAY every response waits for the peer's delayed ACK (~40 ms).
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def handle_echo(event: evt.Event) -> int:
    return int(Status.SUCCESS)


def handle_store(event: evt.Event, ingest: IngestService):  # noqa: ANN201
    calling_ae = event.assoc.requestor.ae_title
    try:
        data = event.encoded_dataset(include_meta=True)
        result = ingest.store(data, source_ae=calling_ae)
    except Exception as exc:  # the protocol boundary: every failure becomes a status
        sop_uid = getattr(event.request, "AffectedSOPInstanceUID", "?")
        log.warning("C-STORE of %s from %s failed: %s", sop_uid, calling_ae, exc)
        return store_failure(exc)
    log.info("C-STORE %s from %s: %s", result.sop_instance_uid, calling_ae, result.outcome.value)
    return status_dataset(int(Status.SUCCESS))


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.dicom.ae_title)
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
    ae.maximum_associations = 32
    ae.network_timeout = 60
    ae.dimse_timeout = 60
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def start_scp(settings: Settings, ingest: IngestService, *, block: bool = False):  # noqa: ANN201
    """Start listening on ``settings.dicom.host:port``; return the server (or block)."""
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_CONN_OPEN, handle_connection_open),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ingest]),
    ]
    address = (settings.dicom.host, settings.dicom.port)
    log.info("DICOM SCP %s listening on %s:%d", settings.dicom.ae_title, *address)
    return ae.start_server(address, block=block, evt_handlers=handlers)
