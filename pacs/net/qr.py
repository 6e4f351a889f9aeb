"""Query/Retrieve SCP handlers: C-FIND, C-GET and C-MOVE (PS3.4 Annex C).

Patient Root and Study Root, hierarchical queries at PATIENT/STUDY/SERIES/
IMAGE level, matched by :mod:`pacs.query.matching` in SQL.  Retrieves send the
stored objects in their stored transfer syntax, so what a modality sent is
what a viewer receives.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from itertools import islice

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom import service_class as _service_class
from pynetdicom.sop_class import (
    Verification,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import Status

from pacs.errors import InvalidQuery, PacsError
from pacs.index.database import Database
from pacs.index.models import Instance
from pacs.index.repository import LOCATION_COLUMNS, find_remote_ae, location_of
from pacs.net.access import QUERY, RETRIEVE, may
from pacs.net.status import status_dataset
from pacs.net.stored import StoredObject
from pacs.net.transport import REQUESTOR_HANDLERS
from pacs.query.identifiers import InformationModel, parse_identifier, response_plan
from pacs.query.matching import Level, build_query
from pacs.storage.objects import Location, ObjectStore, Span, in_planned_order

log = logging.getLogger(__name__)

for _name, _code in (
    ("IDENTIFIER_DOES_NOT_MATCH", 0xA900),  # Failed: identifier does not match SOP class
    ("UNABLE_TO_PROCESS", 0xC000),  # Failed: unable to process
    ("SUB_OPERATIONS_WARNING", 0xB000),  # Warning: sub-operations complete, one or more failures
):
    if not hasattr(Status, _name):
        Status.add(_name, _code)

MODELS = {
    PatientRootQueryRetrieveInformationModelFind: InformationModel.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: InformationModel.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: InformationModel.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: InformationModel.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: InformationModel.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: InformationModel.STUDY_ROOT,
}
QR_CONTEXTS = list(MODELS)


def _model(event: evt.Event) -> InformationModel:
    return MODELS[event.request.AffectedSOPClassUID]


class EncodedIdentifier(Dataset):
    """A C-FIND response identifier already encoded for its presentation context.

    A ``Dataset`` because pynetdicom's C-FIND service takes one per pending
    response and encodes it; :func:`_encode` hands back the bytes instead.
    It holds no elements (pynetdicom's debug log of response identifiers,
    off by default, shows it empty); ``build`` makes the dataset for any
    other encoding.
    """

    def __init__(self, encoded: bytes, implicit_vr: bool, little_endian: bool, build: Callable[[], Dataset]) -> None:
        super().__init__()
        # Plain attributes, past Dataset.__setattr__ (which looks each name up as a DICOM keyword).
        self.__dict__.update(encoded=encoded, encoding=(implicit_vr, little_endian, False), build=build)


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    """pynetdicom's ``encode`` for its service classes, passing an :class:`EncodedIdentifier`'s bytes through."""
    if isinstance(ds, EncodedIdentifier):
        if ds.encoding == (is_implicit_vr, is_little_endian, deflated):
            return ds.encoded
        ds = ds.build()
    return _pynetdicom_encode(ds, is_implicit_vr, is_little_endian, deflated)


# The service classes' module-level ``encode`` (pinned pynetdicom 3.0; see pacs.net.reactor).
_pynetdicom_encode = _service_class.encode
_service_class.encode = _encode


def handle_find(event: evt.Event, db: Database, max_results: int) -> Iterator:
    """Yield (Pending, identifier) per match, then pynetdicom sends Success."""
    calling = event.assoc.requestor.ae_title
    if not may(event, QUERY):
        yield status_dataset(int(Status.NOT_AUTHORIZED), f"{calling} may not query"), None
        return
    try:
        query = parse_identifier(event.identifier, _model(event))
        plan = response_plan(query)
        statement = plan.statement().limit(max_results)
    except InvalidQuery as exc:
        log.info("C-FIND from %s refused: %s", calling, exc)
        yield status_dataset(int(Status.IDENTIFIER_DOES_NOT_MATCH), str(exc)), None
        return
    try:
        with db.transaction() as conn:
            rows = conn.execute(statement).all()
        syntax = event.context.transfer_syntax
        implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
        direct = not syntax.is_deflated  # a deflated context: pynetdicom encodes and deflates the dataset
        count = 0
        for row in rows:
            if event.is_cancelled:
                yield int(Status.CANCEL), None
                return
            encoded = plan.encoded(row, implicit_vr=implicit, little_endian=little) if direct else None
            if encoded is None:
                yield int(Status.PENDING), plan.identifier(row, implicit_vr=implicit, little_endian=little)
            else:
                yield int(Status.PENDING), EncodedIdentifier(encoded, implicit, little, partial(
                    plan.identifier, row, implicit_vr=implicit, little_endian=little))
            count += 1
    except PacsError as exc:
        log.warning("C-FIND from %s failed: %s", calling, exc)
        yield status_dataset(int(Status.UNABLE_TO_PROCESS), str(exc)), None
        return
    log.info("C-FIND from %s at %s level: %d matches", calling, query.level.value, count)


@dataclass(frozen=True)
class _ToSend:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    location: Location


def _instances_to_send(event: evt.Event, db: Database) -> list[_ToSend]:
    query = parse_identifier(event.identifier, _model(event))
    if not query.matching:
        raise InvalidQuery("a retrieve needs at least one unique key (e.g. StudyInstanceUID)")
    statement = build_query(Level.IMAGE, query.matching).with_only_columns(
        Instance.sop_instance_uid, Instance.sop_class_uid, Instance.transfer_syntax_uid,
        *LOCATION_COLUMNS,
    ).order_by(Instance.series_fk, Instance.instance_number, Instance.id)
    with db.session() as session:
        return [
            _ToSend(row.sop_instance_uid, row.sop_class_uid, row.transfer_syntax_uid, location_of(row))
            for row in session.execute(statement)
        ]


# Spans (ObjectStore.plan_spans: objects read together, one each on the
# local store, a few MB of a pack on HDFS, planned over runs of objects in
# the order they lie in their packs) are read and checksummed up to
# ``BlobStore.read_ahead`` spans ahead of the one being sent, by as many
# threads, where a read waits on the network (HDFS): the reads overlap the
# network exchange, and one read's latency (a NameNode call, an HTTP
# exchange) overlaps another's transfer.  The local store's spans are read
# when needed, on the sending thread, while the peer stores the object before.
# Each object of a span read whole is a view of the span's buffer, not a copy
# (C-GET of 500 CT from HDFS, four alternating server starts of two fetches:
# the server's CPU per image 1.11 ms with copies, 1.01 ms without; 335 and 361
# MB/s).


def _read_ahead(objects: ObjectStore, matches: list[_ToSend]) -> Iterator[tuple[_ToSend, bytes | PacsError]]:
    """Each match with its bytes (or the error reading them), in order, read a span at a time ahead of use."""
    spans = objects.plan_spans(item.location for item in matches)
    return zip(matches, in_planned_order(_spans_read_ahead(objects, spans)))


def _spans_read_ahead(objects: ObjectStore, spans: Iterator[Span]) -> Iterator[tuple[Span, list[bytes | PacsError]]]:
    ahead = objects.blobs.read_ahead
    read = partial(objects.read_span, views=True)  # each object is sent and dropped: no copy
    if ahead <= 0:
        for span in spans:
            yield span, read(span)
        return
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="retrieve-read") as reader:
        queued: deque[tuple[Span, Future]] = deque(
            (span, reader.submit(read, span)) for span in islice(spans, ahead))
        while queued:
            span, reading = queued.popleft()
            for later in islice(spans, 1):
                queued.append((later, reader.submit(read, later)))
            yield span, reading.result()


def _send_stored(objects: ObjectStore, matches: list[_ToSend], event: evt.Event) -> Iterator:
    """Yield (Pending, stored object) per match.

    Each object goes out unparsed (:class:`pacs.net.stored.StoredObject`): in
    the stored transfer syntax the peer receives the bytes the modality sent.
    Where the peer accepted only another uncompressed syntax, the object is
    decoded and pynetdicom converts.  The next objects are read while one is
    sent (``BlobStore.read_ahead``).
    """
    for item, data in _read_ahead(objects, matches):
        if event.is_cancelled:
            yield int(Status.CANCEL), None
            return
        # A C-MOVE requester sends nothing while the objects travel over the
        # sub-association: without this the network timeout of the request's
        # association expires during a long move and pynetdicom aborts it.
        event.assoc.dul._idle_timer.restart()
        if isinstance(data, PacsError):
            log.error("retrieve: cannot read SOP instance %s: %s", item.sop_instance_uid, data)
            yield int(Status.UNABLE_TO_PROCESS), None  # counts as a failed sub-operation
            continue
        yield int(Status.PENDING), StoredObject(data, sop_class_uid=item.sop_class_uid,
                                                sop_instance_uid=item.sop_instance_uid,
                                                transfer_syntax_uid=item.transfer_syntax_uid)


def _cannot_list(operation: str, calling: str, exc: PacsError) -> Dataset:
    """The status a retrieve gets when its matches cannot be listed: 0xA900 for a bad identifier,
    0xC000 (unable to process) when the index is unavailable or fails."""
    if isinstance(exc, InvalidQuery):
        log.info("%s from %s refused: %s", operation, calling, exc)
        return status_dataset(int(Status.IDENTIFIER_DOES_NOT_MATCH), str(exc))
    log.warning("%s from %s failed: %s", operation, calling, exc)
    return status_dataset(int(Status.UNABLE_TO_PROCESS), str(exc))


def handle_get(event: evt.Event, db: Database, objects: ObjectStore) -> Iterator:
    calling = event.assoc.requestor.ae_title
    if not may(event, RETRIEVE):
        yield status_dataset(int(Status.NOT_AUTHORIZED), f"{calling} may not retrieve")
        return
    try:
        matches = _instances_to_send(event, db)
    except PacsError as exc:
        yield _cannot_list("C-GET", calling, exc)
        return
    yield len(matches)
    log.info("C-GET from %s: %d instances", calling, len(matches))
    yield from _send_stored(objects, matches, event)


def handle_move(event: evt.Event, db: Database, objects: ObjectStore) -> Iterator:
    calling = event.assoc.requestor.ae_title
    if not may(event, RETRIEVE):
        log.warning("C-MOVE from %s refused: the AE may not retrieve", calling)
        yield None, None
        return
    destination = str(event.move_destination or "").strip()
    with db.session() as session:
        peer = find_remote_ae(session, destination)
        address = (peer.host, peer.port) if peer is not None and peer.may_retrieve else None
    if address is None:
        log.warning("C-MOVE from %s to unknown destination %r", calling, destination)
        yield None, None  # pynetdicom answers 0xA801, move destination unknown
        return
    try:
        matches = _instances_to_send(event, db)
    except PacsError as exc:
        yield *address, {}
        yield _cannot_list("C-MOVE", calling, exc)
        return
    # Propose exactly the stored (SOP class, transfer syntax) pairs, so every
    # object goes out as it was received.
    pairs = sorted({(m.sop_class_uid, m.transfer_syntax_uid) for m in matches})[:128]
    contexts = [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
    yield *address, {"contexts": contexts or [build_context(Verification)], "evt_handlers": REQUESTOR_HANDLERS}
    yield len(matches)
    log.info("C-MOVE from %s to %s: %d instances", calling, destination, len(matches))
    yield from _send_stored(objects, matches, event)


def add_qr_contexts(ae: AE) -> None:
    for sop_class in QR_CONTEXTS:
        ae.add_supported_context(sop_class)
