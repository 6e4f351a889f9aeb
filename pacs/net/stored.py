"""Stored objects sent as they were received: no parse, no re-encode.

A retrieve (C-GET, C-MOVE) or ``pacs push`` sends each object in the
transfer syntax it was stored in, and for a Part 10 object that is simply
the bytes after its file meta group — what the modality sent over its
association.  pynetdicom's ``send_c_store`` wants a pydicom ``Dataset`` (or
a whole file), which costs a parse of every element and an encode back,
about a millisecond per CT image.  :class:`StoredObject` carries the stored
bytes instead, and :func:`send_stored` builds the C-STORE request around
them, as ``send_c_store`` would around an encoded dataset.

Where the peer accepted the SOP class but not the stored transfer syntax,
the object is decoded and handed to pynetdicom's ``send_c_store``, which
converts between the uncompressed syntaxes as before.

:func:`pacs.net.transport.handle_connection_open` routes ``send_c_store`` of
every association the archive takes part in through here.  Should a
:class:`StoredObject` ever reach pynetdicom's own method, that refuses it (it
has no file meta to take a transfer syntax from) rather than send two
elements.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from pacs.net.commands import command_set
from pacs.net.reactor import hold_reactor

_META_GROUP_LENGTH = struct.Struct("<I")
# A Part 10 file: 128-byte preamble, "DICM", then (0002,0000) UL with its 4-byte value.
_GROUP_LENGTH_AT = 128 + 4 + 8


class StoredObject(Dataset):
    """A stored Part 10 object on its way to a peer, unparsed.

    A ``Dataset`` so that pynetdicom's retrieve services accept it as the
    pending sub-operation's dataset; it holds only the two identifying UIDs
    as elements, and the stored bytes beside them.
    """

    def __init__(self, part10: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.part10 = part10
        self.transfer_syntax_uid = transfer_syntax_uid

    def dataset_bytes(self) -> memoryview:
        """The encoded data set: everything after the file meta group."""
        data = memoryview(self.part10)
        if len(data) < _GROUP_LENGTH_AT + 4 or bytes(data[128:132]) != b"DICM":
            raise ValueError(f"SOP instance {self.SOPInstanceUID}: expected a Part 10 object, got another layout")
        (group_length,) = _META_GROUP_LENGTH.unpack_from(data, _GROUP_LENGTH_AT)
        return data[_GROUP_LENGTH_AT + 4 + group_length:]

    def decoded(self) -> Dataset:
        """The object parsed by pydicom (for a peer that needs another transfer syntax)."""
        return dcmread(io.BytesIO(self.part10))


def send_stored(assoc: Association, obj: StoredObject, *, msg_id: int = 1, priority: int = 2,
                originator_aet: str | None = None, originator_id: int | None = None) -> Dataset | None:
    """C-STORE ``obj`` in its stored transfer syntax; None when the peer accepted no such context.

    Returns the response's status dataset as ``send_c_store`` does (empty
    when no response came within the DIMSE timeout, the association then
    aborted).  Must be called where ``send_c_store`` may be: the reactor is
    paused through the same checkpoint.
    """
    if not assoc.is_established:
        raise RuntimeError("The association with a peer SCP must be established before sending a C-STORE request")
    try:
        context = assoc._get_valid_context(obj.SOPClassUID, obj.transfer_syntax_uid, "scu", allow_conversion=False)
    except ValueError:
        return None
    request = C_STORE()
    request.MessageID = msg_id
    request.Priority = priority
    request.MoveOriginatorApplicationEntityTitle = originator_aet
    request.MoveOriginatorMessageID = originator_id
    request.AffectedSOPClassUID = obj.SOPClassUID
    request.AffectedSOPInstanceUID = obj.SOPInstanceUID
    dataset = obj.dataset_bytes()
    # As send_c_store: pause the reactor so that it cannot take the response.
    hold_reactor(assoc)
    try:
        _send_message(assoc, request, context.context_id, dataset)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(response)


def _send_message(assoc: Association, request: C_STORE, context_id: int, dataset: memoryview) -> None:
    """Send the C-STORE request: in one piece where the DUL provider can (pacs.net.reactor), else through DIMSE.

    The data set is the stored bytes themselves, not a copy in the request's ``BytesIO``.
    """
    send_now = getattr(assoc.dul, "send_message_now", None)
    if send_now is not None and not assoc.get_handlers(evt.EVT_DIMSE_SENT):
        command = command_set(request, has_data=True)
        if command is not None and send_now(context_id, command, dataset, assoc.dimse.maximum_pdu_size):
            return
    request.DataSet = io.BytesIO(dataset)
    assoc.dimse.send_msg(request, context_id)


def sending_stored(assoc: Association, send_c_store: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """Wrap an association's ``send_c_store`` so that a :class:`StoredObject` goes out unparsed."""

    def send(dataset, *args, **kwargs) -> Dataset:  # noqa: ANN001 - as pynetdicom's signature
        if isinstance(dataset, StoredObject):
            options = dict(zip(("msg_id", "priority", "originator_aet", "originator_id"), args), **kwargs)
            status = send_stored(assoc, dataset, **options)
            if status is not None:
                return status
            dataset = dataset.decoded()  # the peer wants another transfer syntax: pynetdicom converts
        return send_c_store(dataset, *args, **kwargs)

    return send


__all__ = ["StoredObject", "send_stored", "sending_stored"]
