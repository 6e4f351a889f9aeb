"""The archive's DICOM SCP: Verification, Storage and Query/Retrieve (FIND, GET, MOVE).

Handlers get the services they need bound as extra arguments (pynetdicom's
``evt_handlers`` tuples), never through globals.  C-STORE hands the received
bytes — exactly as they arrived, with the file meta pynetdicom prepends — to
the ingest service and answers only after the instance is durable and indexed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.status import Status
from pynetdicom.transport import AssociationServer

from pacs.errors import ObjectTooLarge
from pacs.ingest.service import BufferChain, IngestService, ReceivedFile, StoreOutcome
from pacs.net.access import STORE, handle_requested, may
from pacs.net.commands import part10_head
from pacs.net.qr import add_qr_contexts, handle_find, handle_get, handle_move
from pacs.net.reactor import EventDrivenAE, EventDrivenRequestHandler, awaiting_request
from pacs.net.status import status_dataset, store_failure
from pacs.net.transport import configure_pynetdicom_logging, handle_connection_open
from pacs.services import Services
from pacs.settings import Settings

log = logging.getLogger(__name__)

# The longest P-DATA-TF PDU the archive takes, announced at association.  Large enough that a
# 0.5 MB image comes in one PDU where the peer sends that much at once (dcmtk sends 128 kB PDUs);
# bounded, because each PDU is read into one buffer: with no limit announced, a peer could make
# the process allocate whatever its PDU header claimed (pacs.net.reactor refuses longer PDUs).
MAX_PDU_LENGTH = 4 << 20
# A C-STORE data set growing past this goes on in an unnamed file under <data_dir>/tmp, not in
# memory (pacs.net.reactor): at most this much of a received object is held in memory.
SPOOL_RECEIVED_BYTES = 64 << 20
# Connections a worker holds that have not sent their A-ASSOCIATE-RQ yet.  A peer sends it within
# milliseconds of connecting; a connection that says nothing would wait up to the ACSE timeout.
# Past this many the oldest is closed (ArchiveAssociationServer), so connections that never speak
# cannot crowd out those that do.
MAX_WAITING_CONNECTIONS = 64
# Connections the kernel holds for the server to accept.  socketserver's default is 5: past that a
# burst of connections (ten viewers opening at once) had its SYNs dropped and retried a second later.
LISTEN_BACKLOG = 128
# At most one WARNING about the waiting connections closed in this many seconds.
CLOSED_REPORT_INTERVAL_S = 10.0


def handle_echo(event: evt.Event) -> int:
    return int(Status.SUCCESS)


def handle_store(event: evt.Event, ingest: IngestService):  # noqa: ANN201
    calling_ae = event.assoc.requestor.ae_title
    tally = _store_tally(event.assoc)
    if not may(event, STORE):
        tally["refused"] += 1
        return status_dataset(int(Status.NOT_AUTHORIZED), f"{calling_ae} may not store")
    request = event.request
    oversized = getattr(request, "_pacs_oversized", 0)
    if oversized:  # refused as it arrived, its bytes past the limit dropped (pacs.net.reactor)
        limit_mb = ingest.settings.max_object_mb
        log.warning("C-STORE of %s from %s refused: its data set passed %d MB (storage.max_object_mb=%d); "
                    "%d bytes received", request.AffectedSOPInstanceUID, calling_ae, limit_mb, limit_mb, oversized)
        tally["failed"] += 1
        return store_failure(ObjectTooLarge(f"data set over {limit_mb} MB"))
    try:
        with _received(request, event.context.transfer_syntax) as received:
            result = ingest.store(received, source_ae=calling_ae, write_first=_sends_new_instances(tally))
    except Exception as exc:  # the protocol boundary: every failure becomes a status
        sop_uid = getattr(event.request, "AffectedSOPInstanceUID", "?")
        log.warning("C-STORE of %s from %s failed: %s", sop_uid, calling_ae, exc)
        tally["failed"] += 1
        return store_failure(exc)
    tally[result.outcome.value] += 1
    log.debug("C-STORE %s from %s: %s", result.sop_instance_uid, calling_ae, result.outcome.value)
    return int(Status.SUCCESS)  # a plain status: pynetdicom builds no dataset for it


@contextmanager
def _received(request, transfer_syntax: str) -> Iterator[BufferChain | ReceivedFile]:  # noqa: ANN001 - a C_STORE
    """The object as received, for ingest, without copying the receiver's buffer.

    Held in memory once, or past SPOOL_RECEIVED_BYTES in an unnamed file that
    holds its head too (see docs/conformance.md); with the head and digest the
    reactor made as the data set arrived, if it did.
    """
    sha256 = getattr(request, "_pacs_sha256", None)
    spooled = getattr(request, "_pacs_spooled", None)
    if spooled is not None:
        with spooled:
            yield ReceivedFile(spooled, sha256)
        return
    head = getattr(request, "_pacs_head", None) if sha256 else None
    if head is None:
        head = part10_head(request.AffectedSOPClassUID, request.AffectedSOPInstanceUID, transfer_syntax)
    with request.DataSet.getbuffer() as dataset, BufferChain(head, dataset, sha256=sha256) as chain:
        yield chain


def _sends_new_instances(tally: Counter) -> bool:
    """Whether this association has stored new instances and re-sent none.

    A scanner sends a study's instances once; its stores are then written
    before their UIDs are looked up (:meth:`IngestService.store`).  A sender
    that re-sends anything, from its first store on, is looked up first for
    the rest of the association, so a re-sent study leaves at most one
    unreferenced record behind.
    """
    return tally[StoreOutcome.STORED.value] > 0 and not any(
        tally[outcome.value] for outcome in StoreOutcome if outcome is not StoreOutcome.STORED
    )


def _store_tally(assoc) -> Counter:  # noqa: ANN001 - pynetdicom's Association
    tally = getattr(assoc, "pacs_stores", None)
    if tally is None:
        tally = assoc.pacs_stores = Counter()
        assoc.pacs_stores_since = time.monotonic()
    return tally


def handle_connection_close(event: evt.Event) -> None:
    """One line per association that stored anything: what it stored, how fast.

    Each instance is logged at DEBUG only: a scanner sends thousands per
    study, and a line per association is what an operator reads.
    """
    tally = getattr(event.assoc, "pacs_stores", None)
    if not tally:
        return
    seconds = time.monotonic() - event.assoc.pacs_stores_since
    total = sum(tally.values())
    outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items()))
    log.info(
        "association from %s (%s:%s) ended: %d C-STORE (%s) in %.1f s, %.0f/s",
        event.assoc.requestor.ae_title, event.assoc.requestor.address, event.assoc.requestor.port,
        total, outcomes, seconds, total / seconds if seconds > 0 else 0.0,
    )


# pynetdicom accepts, per presentation context, the first syntax of *this*
# list that the requestor proposed.  Encoded syntaxes come first: a requestor
# that offers one (storescu -xr, getscu +xr) prefers it, and a retrieve then
# sends stored compressed objects without conversion.
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
TRANSFER_SYNTAXES = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in UNCOMPRESSED] + UNCOMPRESSED


def build_ae(settings: Settings) -> EventDrivenAE:
    configure_pynetdicom_logging(settings.log_level)
    ae = EventDrivenAE(ae_title=settings.dicom.ae_title)
    ae.maximum_pdu_size = MAX_PDU_LENGTH
    ae.max_received_object_bytes = settings.storage.max_object_mb << 20
    ae.spool_received_bytes = SPOOL_RECEIVED_BYTES
    ae.spool_dir = str(settings.data_dir / "tmp")
    os.makedirs(ae.spool_dir, exist_ok=True)
    # The limit on associations is handle_requested's (settings.dicom.max_associations), which counts
    # those whose request came; pynetdicom's own counts every accepted connection, so it gets room for
    # the waiting ones and never refuses first.
    ae.maximum_associations = settings.dicom.max_associations + MAX_WAITING_CONNECTIONS
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = settings.dicom.network_timeout_s
    ae.add_supported_context(Verification, UNCOMPRESSED)
    for context in AllStoragePresentationContexts:
        # scp_role: a C-GET requestor may act as Storage SCP on these contexts.
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES, scp_role=True, scu_role=False)
    add_qr_contexts(ae)
    return ae


class _SupportedContexts(list):
    """The server's supported contexts, handed to each new association without copying the contexts.

    pynetdicom deep-copies the acceptor's contexts for every association:
    ~180 storage contexts x ~40 transfer syntaxes, ~0.4 ms of each
    association's set-up on an idle machine and several times that under
    load.  Negotiation only reads them (``negotiate_as_acceptor`` builds new
    result contexts), and what an association adds for itself (contexts for
    unknown SOP classes, ``pacs.net.access``) is appended to its own list; so
    each association gets a new list of the same context objects.
    """

    def __deepcopy__(self, memo: dict) -> list[PresentationContext]:
        return list(self)


class ArchiveAssociationServer(AssociationServer):
    """pynetdicom's association server, accepting connections without waiting on any one peer.

    - Each connection's association is made and started on the accepting
      thread, as pynetdicom's blocking server does, not on a thread started
      per connection only to start the association's own: that thread cost
      each association ~0.2 ms and a hand-off of the GIL before its request
      was read.  Making and starting an association waits on nothing from
      the peer.
    - A TLS connection is handed on before its handshake, which the
      association's own thread does within the ACSE timeout
      (:class:`pacs.net.reactor.EventDrivenDUL`).  pynetdicom's server
      shakes hands on the accepting thread with no time limit: one client
      that connected and said nothing stopped the port accepting anyone.
    - Connections that have not sent their association request are capped
      at ``MAX_WAITING_CONNECTIONS``: past that, the oldest is closed.
      pynetdicom holds each until the ACSE timeout and counts it against the
      AE's association limit, so 100 connections that said nothing (from
      anyone who can reach the port, before any AE title is checked) had
      every association rejected for a minute.
    """

    request_queue_size = LISTEN_BACKLOG
    _waiting: deque | None = None  # (accepted at, association) not yet requested, oldest first
    _closed_unlogged = 0  # closed since the last WARNING about them
    _closed_last: tuple[str, float] = ("", 0.0)  # the last one closed: its peer, how long it had said nothing
    _closed_logged_at = -math.inf

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's signature
        self._make_room()
        super().process_request(request, client_address)

    def accepted(self, assoc: Association) -> None:
        """Note an association just made for an accepted connection (see _ArchiveRequestHandler)."""
        if self._waiting is None:
            self._waiting = deque()
        self._waiting.append((time.monotonic(), assoc))

    def _make_room(self) -> None:
        """Forget associations whose request came or that ended; close the oldest waiting past the cap."""
        self._report_closed()  # those closed in the last burst, once the interval has passed
        if not self._waiting:
            return
        self._waiting = deque(entry for entry in self._waiting if entry[1].is_alive() and awaiting_request(entry[1]))
        while len(self._waiting) >= MAX_WAITING_CONNECTIONS:
            accepted_at, assoc = self._waiting.popleft()
            sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            if sock is None:
                continue
            try:
                # The association's own threads see the connection end and finish (pacs.net.reactor).
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue  # closed meanwhile
            self._closed_unlogged += 1
            self._closed_last = (f"{assoc.requestor.address}:{assoc.requestor.port}", time.monotonic() - accepted_at)
            self._report_closed()

    def _report_closed(self) -> None:
        """A WARNING about the waiting connections closed since the last one; at most one every
        ``CLOSED_REPORT_INTERVAL_S``: those closed meanwhile are told by the next connection accepted after."""
        now = time.monotonic()
        if not self._closed_unlogged or now - self._closed_logged_at < CLOSED_REPORT_INTERVAL_S:
            return
        peer, silent_s = self._closed_last
        log.warning("closed %d connection(s) that sent no association request (the last from %s, after %.1f s): "
                    "%d such connections is the most one worker holds", self._closed_unlogged, peer, silent_s,
                    MAX_WAITING_CONNECTIONS)
        self._closed_unlogged, self._closed_logged_at = 0, now


class _ArchiveRequestHandler(EventDrivenRequestHandler):
    """The event-driven connection handler, telling the server of each association it makes."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        self.server.accepted(assoc)
        return assoc


class SharedSocketServer(ArchiveAssociationServer):
    """An association server accepting from a listening socket that other worker processes accept from too.

    ``pacs serve --workers N`` opens the socket once and hands it to every
    worker.  Each worker's server waits for it to become readable and
    tries to accept; the first free worker gets the association and the
    others find nothing (the socket is non-blocking) and wait again, so
    associations go to workers that are free.  With SO_REUSEPORT the kernel
    chose a worker by hashing the connection's addresses instead: four
    parallel associations often landed three or four on one worker while
    the other idled (measured: 500 CT over 4 associations took 1.26 s when
    they split 2-2 and 1.61-1.65 s when all four landed on one worker).
    """

    listening: socket.socket  # set on the subclass start_scp makes for each server

    def server_bind(self) -> None:
        self.socket.close()  # the one TCPServer made for us
        self.socket = self.listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    def server_close(self) -> None:
        # close this process's descriptor only: shutdown() would stop the other workers' accepts too
        self.socket.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """The non-blocking listening socket that ``pacs serve`` workers share (see :class:`SharedSocketServer`)."""
    sock = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def start_scp(services: Services, *, block: bool = False, listening: socket.socket | None = None):  # noqa: ANN201
    """Start listening on ``settings.dicom.host:port``; return the server (or block).

    ``listening``: a socket from :func:`listening_socket` shared with other
    worker processes, accepted from instead of a socket of the server's own.
    """
    settings = services.settings
    ae = build_ae(settings)
    allow_list = services.db if settings.require_known_ae else None
    unknown = TRANSFER_SYNTAXES if settings.dicom.accept_unknown_sop_classes else None
    handlers = [
        (evt.EVT_CONN_OPEN, handle_connection_open),
        (evt.EVT_CONN_CLOSE, handle_connection_close),
        (evt.EVT_REQUESTED, handle_requested, [settings.dicom.max_associations, allow_list, unknown]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [services.ingest]),
        (evt.EVT_C_FIND, handle_find, [services.db, settings.dicom.max_find_results]),
        (evt.EVT_C_GET, handle_get, [services.db, services.objects]),
        (evt.EVT_C_MOVE, handle_move, [services.db, services.objects]),
    ]
    address = (settings.dicom.host, settings.dicom.port)
    context = tls_context(settings)
    server = ae.make_server(
        address,
        evt_handlers=handlers,
        ssl_context=context,
        server_class=(type("SharedSocketServer", (SharedSocketServer,), {"listening": listening})
                      if listening is not None else ArchiveAssociationServer),
        request_handler=_ArchiveRequestHandler,
    )
    server.contexts = _SupportedContexts(server.contexts)
    log.info(
        "DICOM SCP %s listening on %s:%d%s%s", settings.dicom.ae_title, *address,
        " (TLS)" if context else "", " (known AEs only)" if settings.require_known_ae else "",
    )
    if block:
        server.serve_forever()
        return None
    threading.Thread(target=server.serve_forever, name=f"scp-{settings.dicom.port}", daemon=True).start()
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() removes it again
    return server


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context, or None when no certificate is configured."""
    dicom = settings.dicom
    if dicom.tls_cert_file is None and dicom.tls_key_file is None:
        return None
    if dicom.tls_cert_file is None or dicom.tls_key_file is None:
        raise ValueError("DICOM TLS needs both dicom.tls_cert_file and dicom.tls_key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(dicom.tls_cert_file, dicom.tls_key_file)
    if dicom.tls_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(dicom.tls_ca_file)
    return context
