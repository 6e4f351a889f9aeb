"""C-GET and C-MOVE served by the archive's own sub-operation loop.

pynetdicom's Query/Retrieve SCP asks the handler for the next object only
after the peer has answered the previous C-STORE, and then builds the next
request: the handler's step, a status dataset from the response, a response
primitive, the command set, the data set cut into PDUs.  All of that happens
while the peer waits — measured on loopback with ``getscu`` and 500 CT
images, 0.34 ms from the peer's response to the next request, against
0.58 ms that the peer itself takes per image.

Here the loop takes the next object from the handler and encodes its whole
request (``pacs.net.stored.encode_stored``) while the peer is still storing
the previous one, so that the peer's response is answered by a write of
bytes ready to go.  One sub-operation is still outstanding at a time: the
archive negotiates no asynchronous operations window, and neither ``getscu``
nor Orthanc use one.

What the requester sees is pynetdicom's Query/Retrieve SCP (PS3.4 C.4.2,
C.4.3): the same handler protocol (C-MOVE: the destination, then the number
of sub-operations; then ``(status, dataset)`` per object), the same final
statuses and counts (0x0000; 0xB000 with the Failed SOP Instance UID List
when some sub-operations failed; 0xA702 when all did; the handler's own
failure or cancel status with the counts so far), the same error statuses
for a failing handler (0xC411 / 0xC511, 0xC413 / 0xC513, 0xC514, 0xC515,
0xC416 / 0xC516), Pending responses thinned as ``pacs.net.reactor`` thins
them.  Two things differ, both towards the standard:

* a handler's status dataset where the number of sub-operations is expected
  (the archive's refusals: not authorised, a bad identifier) is sent as
  that status, with its Error Comment, rather than as 0xC413/0xC513;
* a C-MOVE's sub-operations carry the requester's AE title as Move
  Originator AE Title (PS3.7 9.1.1.1), not the archive's own.

Requests this loop leaves to pynetdicom: another SOP class (Composite
Instance Root, Without Bulk Data), a context the association did not accept,
a handler bound to EVT_DIMSE_SENT, or pynetdicom's request identifier
logging switched on.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom._globals import STATUS_CANCEL, STATUS_FAILURE, STATUS_PENDING, STATUS_SUCCESS, STATUS_WARNING
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS, STORAGE_SERVICE_CLASS_STATUS

from pacs.net.reactor import IDLE_WAIT_S, PENDING_INTERVAL_S, hold_reactor, release_reactor
from pacs.net.stored import StoredObject, encode_stored

log = logging.getLogger(__name__)

_MAX_SUBOPERATIONS = 0xFFFF


@dataclass(frozen=True)
class _Kind:
    primitive: type
    event: evt.InterventionEvent
    models: frozenset[str]
    statuses: dict
    handler_failed: int  # the handler raised
    bad_count: int  # the handler's number of sub-operations is not one
    too_many: int  # more than 65535 sub-operations
    name: str


_GET = _Kind(C_GET, evt.EVT_C_GET,
             frozenset({PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet}),
             QR_GET_SERVICE_CLASS_STATUS, 0xC411, 0xC413, 0xC416, "C-GET")
_MOVE = _Kind(C_MOVE, evt.EVT_C_MOVE,
              frozenset({PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove}),
              QR_MOVE_SERVICE_CLASS_STATUS, 0xC511, 0xC513, 0xC516, "C-MOVE")
_KINDS = {C_GET: _GET, C_MOVE: _MOVE}
_MOVE_BAD_DESTINATION = 0xC515  # the handler yielded no usable (address, port[, kwargs])
_MOVE_NO_DESTINATION = 0xC514  # the handler yielded nothing where the destination should be
_DESTINATION_UNKNOWN = 0xA801
_ALL_FAILED = 0xA702
_SOME_FAILED = 0xB000


def serving_retrieves(assoc: Association, serve_request: Callable[[object, int], None]) -> Callable[[object, int], None]:
    """Wrap an association's ``_serve_request``: C-GET and C-MOVE requests it can take go to :func:`serve`."""

    def serve_one(request: object, context_id: int) -> None:
        if not serve(assoc, request, context_id):
            serve_request(request, context_id)

    return serve_one


def serve(assoc: Association, request: object, context_id: int) -> bool:
    """Serve a C-GET-RQ or C-MOVE-RQ with the archive's loop; False leaves it to pynetdicom."""
    kind = _KINDS.get(type(request))
    if kind is None or assoc._sent_release:
        return False
    context = assoc._accepted_cx.get(context_id)
    if (context is None or not request.is_valid_request or request.AffectedSOPClassUID not in kind.models
            or assoc.get_handlers(evt.EVT_DIMSE_SENT) or _config.LOG_REQUEST_IDENTIFIERS):
        return False
    # As pynetdicom's _serve_request: a fresh C-CANCEL record, and the reactor marked paused while the
    # handler runs (it may call send_c_*()).
    assoc.dimse.cancel_req = {}
    assoc._is_paused = True
    try:
        _Retrieve(assoc, request, context, kind).run()
    finally:
        assoc._is_paused = False
        assoc.dimse.cancel_req = {}
    return True


class _Retrieve:
    """One C-GET or C-MOVE request, from the handler's first yield to the final response."""

    def __init__(self, assoc: Association, request: C_GET | C_MOVE, context, kind: _Kind) -> None:  # noqa: ANN001
        self.assoc, self.request, self.kind, self.context = assoc, request, kind, context
        syntax = context.transfer_syntax[0]
        self.encoding = (syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        self.total = self.remaining = self.failed = self.warning = self.completed = 0
        self.failed_uids: list[str] = []
        self.last_msg_id = request.MessageID
        self.pending_sent_at = -math.inf

    def respond(self, status: int | Dataset, *, counts: bool = False, remaining: bool = False,
                failed_list: bool = False) -> None:
        """Send a response: ``status`` (a code, or a status dataset whose elements are taken), the counts, the list."""
        rsp = self.kind.primitive()
        rsp.MessageIDBeingRespondedTo = self.request.MessageID
        rsp.AffectedSOPClassUID = self.request.AffectedSOPClassUID
        if isinstance(status, Dataset):
            rsp = QueryRetrieveServiceClass(self.assoc).validate_status(status, rsp)
        else:
            rsp.Status = status
        if remaining:
            rsp.NumberOfRemainingSuboperations = self.remaining
        if counts:
            rsp.NumberOfFailedSuboperations = self.failed
            rsp.NumberOfWarningSuboperations = self.warning
            rsp.NumberOfCompletedSuboperations = self.completed
        if failed_list:
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = self.failed_uids
            rsp.Identifier = BytesIO(encode(identifier, *self.encoding))
        self.assoc.dimse.send_msg(rsp, self.context.context_id)

    def run(self) -> None:
        kind, assoc = self.kind, self.assoc
        try:
            handler = evt.trigger(assoc, kind.event, {"request": self.request, "context": self.context.as_tuple,
                                                      "_is_cancelled": self._is_cancelled})
        except Exception:  # noqa: BLE001 - answered with pynetdicom's status for a failing handler
            log.exception("%s handler failed", kind.name)
            self.respond(kind.handler_failed)
            return
        if not assoc.is_established:
            return
        results = _Results(handler)
        destination = None
        if kind is _MOVE:
            destination = results.next()
            if isinstance(destination, (_Failure, _Done)):
                self.respond(_MOVE_NO_DESTINATION)
                return
            if not isinstance(destination, tuple) or len(destination) < 2:
                self.respond(_MOVE_BAD_DESTINATION)
                return
            if None in destination[:2]:
                log.error("%s to unknown destination %r", kind.name, self.request.MoveDestination)
                self.respond(_DESTINATION_UNKNOWN)
                return
        count = results.next()
        if isinstance(count, Dataset) and "Status" in count:
            self.respond(count)  # the handler refused the request with its own status
            return
        try:
            count = int(count)
        except (TypeError, ValueError):
            log.error("%s handler yielded %r where the number of sub-operations belongs", kind.name, count)
            self.respond(kind.bad_count)
            return
        if not assoc.is_established:
            return
        if count < 1:
            self.respond(0x0000, counts=True)
            return
        if count > _MAX_SUBOPERATIONS:
            log.error("%s handler yielded %d sub-operations, more than 65535", kind.name, count)
            self.respond(kind.too_many)
            return
        self.total = self.remaining = count
        if kind is _GET:
            self.suboperations(results, assoc, None)
            return
        kwargs = {"ae_title": self.request.MoveDestination}
        if len(destination) >= 3 and destination[2]:
            kwargs.update(destination[2])
        try:
            store_assoc = assoc.ae.associate(destination[0], destination[1], **kwargs)
        except Exception:  # noqa: BLE001 - pynetdicom's status for a destination it cannot use
            log.exception("%s: cannot request an association with %r", kind.name, destination[:2])
            self.respond(_MOVE_BAD_DESTINATION)
            return
        if not store_assoc.is_established:
            log.error("%s: no association with the destination %s", kind.name, self.request.MoveDestination)
            self.respond(_DESTINATION_UNKNOWN)
            if store_assoc.dul.socket is not None:
                store_assoc.dul.socket.close()
            return
        try:
            self.suboperations(results, store_assoc, assoc.requestor.ae_title)
        finally:
            if store_assoc.is_established and not _gone(store_assoc):
                store_assoc.release()

    def _is_cancelled(self, msg_id: int) -> bool:
        return self.assoc.dimse.cancel_req.pop(msg_id, None) is not None

    def suboperations(self, results: _Results, store_assoc: Association, originator: str | None) -> None:
        """Send each object the handler yields, the next one's request encoded while the peer stores the last."""
        assoc = self.assoc
        hold_reactor(store_assoc)  # its responses are ours to take off the queue (a no-op for a C-GET)
        try:
            upcoming = self.prepare(results.next(), store_assoc, originator)
            while True:
                if not assoc.is_established or _gone(assoc):
                    return  # the requester aborted or went away: no one to answer
                if isinstance(upcoming.result, _Done) or assoc.acse.is_release_requested():
                    # a release request in the middle ends the sub-operations, as pynetdicom ends them
                    self.finish()
                    return
                if self.remaining <= 0:
                    log.warning("%s handler yielded more results than sub-operations; ignored", self.kind.name)
                    self.finish()
                    return
                if isinstance(upcoming.result, _Failure):
                    status, dataset = self.kind.handler_failed, None
                else:
                    status, dataset = _pair(upcoming.result)
                category = _category(status, self.kind.statuses)
                if category == STATUS_PENDING:
                    if dataset is not None:
                        upcoming = self.suboperation(results, store_assoc, upcoming, dataset, originator)
                    else:  # pynetdicom ignores a Pending without a dataset
                        upcoming = self.prepare(results.next(), store_assoc, originator)
                    continue
                self.end(status, category, dataset)
                return
        finally:
            release_reactor(store_assoc)

    def prepare(self, result: object, store_assoc: Association, originator: str | None) -> _Upcoming:
        """The handler's result, with its C-STORE request encoded when it is a stored object to send."""
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], StoredObject)
                and _category(result[0], self.kind.statuses) == STATUS_PENDING):
            return _Upcoming(result)
        msg_id = self._next_msg_id()
        try:
            message = encode_stored(store_assoc, result[1], msg_id=msg_id, originator_aet=originator,
                                    originator_id=self.request.MessageID if originator else None)
        except ValueError:
            message = None  # sent through send_c_store, which reports it as a failed sub-operation
        return _Upcoming(result, msg_id, message)

    def suboperation(self, results: _Results, store_assoc: Association, current: _Upcoming, dataset: object,
                     originator: str | None) -> _Upcoming:
        """One C-STORE sub-operation, the handler's next result prepared meanwhile; returns that."""
        upcoming = None
        msg_id = current.msg_id if current.msg_id is not None else self._next_msg_id()
        if _gone(store_assoc):
            code = None  # the destination aborted or went away: the rest fail without a try
        elif current.message is not None and store_assoc.dul.send_encoded_now(current.message):
            upcoming = self.prepare(results.next(), store_assoc, originator)  # while the peer stores this one
            code = self._status_of(store_assoc, _await_response(store_assoc))
        else:
            code = self._send_through_pynetdicom(store_assoc, dataset, msg_id, originator)
        category = STORAGE_SERVICE_CLASS_STATUS.get(code, (STATUS_FAILURE,))[0]
        if category == STATUS_FAILURE:
            self.failed += 1
            uid = dataset.get("SOPInstanceUID") if isinstance(dataset, Dataset) else None
            if uid is not None:
                self.failed_uids.append(uid)
        elif category == STATUS_WARNING:
            self.warning += 1
        elif category == STATUS_SUCCESS:
            self.completed += 1
        self.remaining -= 1
        # Pending responses at most every PENDING_INTERVAL_S (as pacs.net.reactor thins them), decided
        # here so that the others are not even built; the time taken after the send, so the thinning
        # there, timed from its own send, never drops one of these.
        if time.monotonic() - self.pending_sent_at >= PENDING_INTERVAL_S:
            self.respond(0xFF00, counts=True, remaining=True)
            self.pending_sent_at = time.monotonic()
        return upcoming if upcoming is not None else self.prepare(results.next(), store_assoc, originator)

    def _next_msg_id(self) -> int:
        """Sub-operation Message IDs: the request's plus one per sub-operation, wrapping past 65535 as pynetdicom's."""
        self.last_msg_id += 1
        if self.last_msg_id > 0xFFFF:
            self.last_msg_id -= 0xFFFF
        return self.last_msg_id

    def _status_of(self, store_assoc: Association, response: object) -> int | None:
        if response is None:
            store_assoc._handle_no_response()  # aborts on a DIMSE timeout, as send_c_store does
            return None
        if type(response) is not C_STORE or not response.is_valid_response:
            log.error("%s: the peer answered a C-STORE sub-operation with an invalid %s", self.kind.name,
                      type(response).__name__)
            store_assoc.abort()
            return None
        return response.Status

    def _send_through_pynetdicom(self, store_assoc: Association, dataset: object, msg_id: int,
                                 originator: str | None) -> int | None:
        extra = {} if originator is None else {"originator_aet": originator, "originator_id": self.request.MessageID}
        try:
            return store_assoc.send_c_store(dataset, msg_id=msg_id, **extra).Status
        except Exception as exc:  # noqa: BLE001 - a sub-operation that could not be sent counts as failed
            log.warning("%s: C-STORE sub-operation failed: %s", self.kind.name, exc)
            return None
        finally:
            hold_reactor(store_assoc)  # send_c_store let the reactor go (or linger): the next responses are ours

    def end(self, status: int | Dataset, category: str, dataset: object) -> None:
        """The handler's own last word: cancel, failure, warning or success, with the counts so far."""
        if isinstance(dataset, Dataset) and "FailedSOPInstanceUIDList" in dataset:
            self.failed_uids = list(dataset.FailedSOPInstanceUIDList)
        if category == STATUS_CANCEL:
            self.respond(status, counts=True, remaining=True, failed_list=True)
        elif category in (STATUS_FAILURE, STATUS_WARNING):
            self.failed += self.remaining  # what was not sent failed
            self.respond(status, counts=True, failed_list=True)
        elif category == STATUS_SUCCESS:
            self.finish()
        else:
            self.respond(status)  # not a status of the service: pynetdicom sends it as it is

    def finish(self) -> None:
        """The final response once the objects are sent: Success, or 0xB000 / 0xA702 with the failed UIDs."""
        if not self.failed and not self.warning:
            self.respond(0x0000, counts=True)
        elif self.failed == self.total:
            self.respond(_ALL_FAILED, counts=True, failed_list=True)
        else:
            self.respond(_SOME_FAILED, counts=True, failed_list=True)


def _gone(assoc: Association) -> bool:
    """An association that ended under a paused reactor: aborted by the peer, or its connection closed."""
    return assoc.acse.is_aborted() or not assoc.dul.is_alive()


def _await_response(store_assoc: Association) -> object | None:
    """The peer's response to a sub-operation; None when none came within the DIMSE timeout, or the
    association ended meanwhile (an A-ABORT from the peer, a closed connection).

    ``get_msg`` would wait out the whole DIMSE timeout (60 s by default) for a peer that aborted: the
    association's reactor, which would notice, is paused while its responses are taken here.  This
    looks every ``IDLE_WAIT_S``.
    """
    timeout = store_assoc.dimse_timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    messages = store_assoc.dimse.msg_queue
    while True:
        wait = IDLE_WAIT_S if deadline is None else min(IDLE_WAIT_S, deadline - time.monotonic())
        if wait <= 0:
            return None
        try:
            return messages.get(timeout=wait)[1]
        except queue.Empty:
            pass
        if _gone(store_assoc):
            return None


@dataclass(frozen=True)
class _Upcoming:
    """A result of the handler, and for a stored object to send its Message ID and encoded request."""

    result: object
    msg_id: int | None = None
    message: list | None = None  # the request's pieces (pacs.net.reactor.message_pieces)


class _Done:
    """The handler has no more results."""


@dataclass(frozen=True)
class _Failure:
    """The handler raised."""

    error: BaseException


class _Results:
    """The handler's yields, one at a time: a value, ``_Done``, or ``_Failure``."""

    def __init__(self, handler: Iterator) -> None:
        self._handler = handler
        self._over = False

    def next(self) -> object:
        if self._over:
            return _Done()
        try:
            return next(self._handler)
        except StopIteration:
            self._over = True
            return _Done()
        except Exception as exc:  # noqa: BLE001 - reported as the handler's failure
            self._over = True
            log.exception("retrieve handler raised")
            return _Failure(exc)


def _pair(result: object) -> tuple[int | Dataset, object]:
    if isinstance(result, tuple) and len(result) == 2:
        return result[0], result[1]
    return result, None


def _category(status: int | Dataset, statuses: dict) -> str:
    code = status.get("Status") if isinstance(status, Dataset) else status
    if isinstance(code, int) and code in statuses:
        return statuses[code][0]
    return ""
