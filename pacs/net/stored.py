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

from pydicom import config, dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.utils import set_ae

from pacs.net.commands import store_request_command
from pacs.net.reactor import hold_reactor, message_pieces, release_reactor

_META_GROUP_LENGTH = struct.Struct("<I")
_SOP_CLASS_UID, _SOP_INSTANCE_UID = 0x00080016, 0x00080018
_UID_CHARACTERS = frozenset("0123456789.")
# A Part 10 file: 128-byte preamble, "DICM", then (0002,0000) UL with its 4-byte value.
_GROUP_LENGTH_AT = 128 + 4 + 8


class StoredObject(Dataset):
    """A stored Part 10 object on its way to a peer, unparsed.

    A ``Dataset`` so that pynetdicom's retrieve services accept it as the
    pending sub-operation's dataset; it holds only the two identifying UIDs
    as elements, and the stored bytes beside them.
    """

    def __init__(self, part10: bytes | memoryview, *, sop_class_uid: str, sop_instance_uid: str,
                 transfer_syntax_uid: str) -> None:
        super().__init__()
        # The UIDs come from the index, which took them from a stored object: set without pydicom's
        # validation of each value (a regex per UID, a sizeable part of a sub-operation's own time).
        self[_SOP_CLASS_UID] = DataElement(_SOP_CLASS_UID, "UI", sop_class_uid, validation_mode=config.IGNORE)
        self[_SOP_INSTANCE_UID] = DataElement(_SOP_INSTANCE_UID, "UI", sop_instance_uid,
                                              validation_mode=config.IGNORE)
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
    context_id = _context_for(assoc, obj.SOPClassUID, obj.transfer_syntax_uid)
    if context_id is None:
        return None
    dataset = obj.dataset_bytes()
    # As send_c_store: pause the reactor so that it cannot take the response.  After a whole exchange
    # it is left paused for the next object (a retrieve, a push, sends them one after another).
    hold_reactor(assoc)
    response = None
    try:
        _send_message(assoc, context_id, dataset, msg_id, priority, obj.SOPClassUID, obj.SOPInstanceUID,
                      originator_aet, originator_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        release_reactor(assoc, more_to_send=response is not None)
    if response is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(response)


def encode_stored(assoc: Association, obj: StoredObject, *, msg_id: int, priority: int = 2,
                  originator_aet: str | None = None, originator_id: int | None = None) -> list | None:
    """The C-STORE request :func:`send_stored` would send for ``obj``, whole and encoded in pieces (for
    ``send_encoded_now``); None where it would not go out in one piece, or not in the stored syntax."""
    context_id = _context_for(assoc, obj.SOPClassUID, obj.transfer_syntax_uid)
    if context_id is None:
        return None
    return encode_store_request(assoc, context_id, obj.dataset_bytes(), msg_id, priority, obj.SOPClassUID,
                                obj.SOPInstanceUID, originator_aet, originator_id)


def _context_for(assoc: Association, sop_class_uid: str, transfer_syntax_uid: str) -> int | None:
    """The ID of the accepted context (this side SCU) for the SOP class in exactly that transfer syntax, or None.

    Looked up once per pair and association (pynetdicom's look-up sorts and
    filters every context on each call); the accepted contexts do not change
    once the association is established.
    """
    found = assoc.__dict__.setdefault("_pacs_store_contexts", {})
    key = (sop_class_uid, transfer_syntax_uid)
    if key not in found:
        try:
            context = assoc._get_valid_context(sop_class_uid, transfer_syntax_uid, "scu", allow_conversion=False)
        except ValueError:
            found[key] = None
        else:
            found[key] = context.context_id
    return found[key]


def _send_message(assoc: Association, context_id: int, dataset: memoryview, msg_id: int, priority: int,
                  sop_class_uid: str, sop_instance_uid: str, originator_aet: str | None,
                  originator_id: int | None) -> None:
    """Send the C-STORE request: in one piece where the DUL provider can (pacs.net.reactor), else through DIMSE.

    The data set is the stored bytes themselves, not a copy in the request's
    ``BytesIO``.
    """
    message = encode_store_request(assoc, context_id, dataset, msg_id, priority, sop_class_uid, sop_instance_uid,
                                   originator_aet, originator_id)
    if message is not None and assoc.dul.send_encoded_now(message):
        return
    request = C_STORE()
    request.MessageID = msg_id
    request.Priority = priority
    request.MoveOriginatorApplicationEntityTitle = originator_aet
    request.MoveOriginatorMessageID = originator_id
    request.AffectedSOPClassUID = sop_class_uid
    request.AffectedSOPInstanceUID = sop_instance_uid
    request.DataSet = io.BytesIO(dataset)
    assoc.dimse.send_msg(request, context_id)


def encode_store_request(assoc: Association, context_id: int, dataset: memoryview, msg_id: int, priority: int,
                         sop_class_uid: str, sop_instance_uid: str, originator_aet: str | None,
                         originator_id: int | None) -> list | None:
    """The whole C-STORE request as the PDUs ``send_encoded_now`` writes (:func:`message_pieces`: views of
    ``dataset`` between the PDU headers), or None where it must go through DIMSE.

    The command set is encoded from the values (the AE title checked as the
    primitive would) without building pynetdicom's request primitive.  None
    for a DUL provider that cannot send encoded messages, a handler bound to
    EVT_DIMSE_SENT (it is handed pynetdicom's message), or values the
    primitive's setters would change or refuse.
    """
    if getattr(assoc.dul, "send_encoded_now", None) is None or assoc.get_handlers(evt.EVT_DIMSE_SENT) \
            or not (_plain_uid(sop_class_uid) and _plain_uid(sop_instance_uid) and 0 <= msg_id <= 0xFFFF
                    and priority in (0, 1, 2) and (originator_id is None or 0 <= originator_id <= 0xFFFF)):
        return None
    try:
        aet = None if originator_aet is None else set_ae(originator_aet, "Move Originator AE Title")
    except ValueError:
        return None  # the primitive's setter logs it and leaves the element out
    command = store_request_command(msg_id, priority, sop_class_uid, sop_instance_uid, aet, originator_id)
    if command is None:
        return None
    return message_pieces(context_id, command, dataset, assoc.dimse.maximum_pdu_size)


def _plain_uid(uid: str) -> bool:
    """A UID the primitive would take as it is: 1 to 64 characters of digits and dots."""
    return 0 < len(uid) <= 64 and _UID_CHARACTERS.issuperset(uid)


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


__all__ = ["StoredObject", "encode_stored", "send_stored", "sending_stored"]
