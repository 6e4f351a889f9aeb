"""DIMSE command sets and Part 10 file meta encoded (and C-STORE requests decoded) directly, without a dataset.

Every DIMSE message starts with a command set: a handful of group-0000
elements in Implicit VR Little Endian (PS3.7 E.1).  pynetdicom builds one by
filling a pydicom ``Dataset`` element by element (each value validated),
encoding it twice (once to learn the group length) and once more to send;
for a C-STORE sub-operation of a retrieve, its pending response, or the
response to every stored instance, that was a sizeable part of the time per
message.  :func:`command_set` writes the same bytes with ``struct``.

The message layout is pynetdicom's own (its table of the elements of each
message type, its rule for Command Data Set Type), so the two cannot drift
apart; ``tests/unit/test_net_commands.py`` compares the bytes with
pynetdicom's for every message the archive sends.  Values this module does
not encode (an Error Comment, an Offending Element list: failure responses,
rare) make it return None, and the caller takes pynetdicom's path.

:func:`store_request` goes the other way for the one message the archive
receives by the thousand: it reads a C-STORE-RQ command set with ``struct``
into the ``C_STORE`` primitive that pynetdicom's ``decode`` of the command
set and ``message_to_primitive`` would make, through the primitive's own
validating setters.  Anything else (another message, an element a C-STORE
request does not have, an empty or multi-valued value) gives None, and
pynetdicom decodes the message itself.  :func:`store_response_of` does the
same for the message a retrieve waits on once per sub-operation: the
peer's plain C-STORE-RSP (a Status and nothing more to say).

:func:`part10_head` does the same for the file meta group that the archive
puts before every received object (``Event.file_meta`` encoded by
``encode_file_meta``, in Explicit VR Little Endian).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dimse_messages import _COMMAND_SET_KEYWORDS, _DATASET_KEYWORDS, _MESSAGE_TYPES

__all__ = ["command_set", "data_set_of", "part10_head", "store_request", "store_request_command", "store_response",
           "store_response_of"]

_ELEMENT_HEADER = struct.Struct("<HHI")  # group, element, value length (Implicit VR Little Endian)
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_NO_DATA_SET = 0x0101
_DATA_SET = 0x0001  # what pynetdicom writes; any value but 0x0101 means "a data set follows"

_COMMAND_FIELD = {names[0]: code for code, names in _MESSAGE_TYPES.items()}


def _layout(message_name: str) -> tuple[tuple[str, int, str], ...]:
    """(keyword, element number, VR) of the message's command elements after the group length, in tag order."""
    elements = []
    for keyword in _COMMAND_SET_KEYWORDS[message_name]:
        if keyword == "CommandGroupLength":
            continue
        tag = tag_for_keyword(keyword)
        elements.append((keyword, tag & 0xFFFF, dictionary_VR(tag)))
    return tuple(sorted(elements, key=lambda e: e[1]))


_LAYOUTS = {name: _layout(name) for name in _COMMAND_SET_KEYWORDS}


def _message_class_name(primitive: object) -> str | None:
    table = _RQ_TO_MESSAGE if getattr(primitive, "MessageIDBeingRespondedTo", None) is None else _RSP_TO_MESSAGE
    message_class = table.get(type(primitive))
    return None if message_class is None else message_class.__name__


def data_set_of(primitive: object) -> object | None:
    """The primitive's data set (a ``BytesIO``) as pynetdicom would send it, or None without one."""
    name = _message_class_name(primitive)
    keyword = _DATASET_KEYWORDS.get(name) if name else None
    return getattr(primitive, keyword, None) if keyword else None


def _value(vr: str, value: object) -> bytes | None:
    if vr == "US":
        return _US.pack(value)
    if vr == "UL":
        return _UL.pack(value)
    if vr in ("UI", "AE") and isinstance(value, str) and value.isascii():
        raw = value.encode("ascii")
        return raw + (b"\0" if vr == "UI" else b" ") if len(raw) % 2 else raw
    return None  # LO (Error Comment), AT (Offending Element): pynetdicom encodes those


def command_set(primitive: object, *, has_data: bool | None = None) -> bytes | None:
    """The encoded command set pynetdicom's ``send_msg`` would send for ``primitive``, or None.

    ``has_data`` says whether a data set follows (default: whether the
    primitive holds one), for a caller that sends the data set's bytes from
    elsewhere.  None for a primitive of a type pynetdicom has no message
    for, one that names its data set by path, or one with a value this
    module leaves to pynetdicom.
    """
    name = _message_class_name(primitive)
    if name is None or getattr(primitive, "_dataset_path", None):
        return None
    message_name = name.replace("_", "-")
    if has_data is None:
        has_data = bool(data_set_of(primitive))
    fixed = {"CommandField": _COMMAND_FIELD[message_name],
             "CommandDataSetType": _DATA_SET if has_data else _NO_DATA_SET}
    return _encoded(message_name, lambda keyword: fixed[keyword] if keyword in fixed
                    else getattr(primitive, keyword, None))


def _encoded(message_name: str, value_of: Callable[[str], object]) -> bytes | None:
    """The message's command set with ``value_of(keyword)`` for each element (None: left out), or None."""
    body = []
    for keyword, element, vr in _LAYOUTS[message_name]:
        value = value_of(keyword)
        if value is None:
            continue
        encoded = _value(vr, value)
        if encoded is None:
            return None
        body.append(_ELEMENT_HEADER.pack(0, element, len(encoded)))
        body.append(encoded)
    content = b"".join(body)
    return _ELEMENT_HEADER.pack(0, 0, 4) + _UL.pack(len(content)) + content


def store_response(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes | None:
    """The command set of a C-STORE-RSP with ``status`` and nothing else (no Error Comment), or None.

    What :func:`command_set` gives for the response primitive pynetdicom's
    Storage SCP builds, without building it; None for a value this module
    leaves to pynetdicom (a UID that is not ASCII).
    """
    values = {
        "AffectedSOPClassUID": sop_class_uid, "MessageIDBeingRespondedTo": message_id, "Status": status,
        "AffectedSOPInstanceUID": sop_instance_uid, "CommandField": _COMMAND_FIELD["C-STORE-RSP"],
        "CommandDataSetType": _NO_DATA_SET,
    }
    return _encoded("C-STORE-RSP", values.get)


def store_request_command(message_id: int, priority: int, sop_class_uid: str, sop_instance_uid: str,
                          originator_aet: str | None = None, originator_id: int | None = None) -> bytes | None:
    """The command set of a C-STORE-RQ with a data set, as :func:`command_set` encodes the request primitive.

    For a sender that writes the message itself (a retrieve's sub-operation):
    no primitive is built.  None for a value this module leaves to
    pynetdicom (one that is not ASCII).
    """
    values = {
        "AffectedSOPClassUID": sop_class_uid, "MessageID": message_id, "Priority": priority,
        "AffectedSOPInstanceUID": sop_instance_uid, "MoveOriginatorApplicationEntityTitle": originator_aet,
        "MoveOriginatorMessageID": originator_id, "CommandField": _COMMAND_FIELD["C-STORE-RQ"],
        "CommandDataSetType": _DATA_SET,
    }
    return _encoded("C-STORE-RQ", values.get)


_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
# The elements of a C-STORE request and of a plain C-STORE response (element number: the primitive's
# attribute and how pydicom reads the value); the group length, Command Field and Command Data Set Type
# have no attribute.  A response with anything more (an Error Comment, an Offending Element) is left to
# pynetdicom.
_STORE_RQ_ELEMENTS = {
    0x0000: None, 0x0100: None, 0x0800: None,
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0110: ("MessageID", "US"),
    0x0700: ("Priority", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
_STORE_RSP_ELEMENTS = {
    0x0000: None, 0x0100: None, 0x0800: None,
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0120: ("MessageIDBeingRespondedTo", "US"),
    0x0900: ("Status", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
}


# A UID pynetdicom's validating setter takes as it is, without a warning: 1 to 64 characters, components
# of digits without a leading zero (PS3.5 9.1).  The primitive's setters spend ~7 us on each UID (a
# UID, a validator, a regex); one such value goes straight into the slot the setter fills, as a UID
# that pydicom does not check again (its own check is the same regex, another ~2 us).
_CONFORMANT_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_UID_SLOTS = {"AffectedSOPClassUID": "_affected_sop_class_uid",
              "AffectedSOPInstanceUID": "_affected_sop_instance_uid"}


def _decoded(vr: str, raw: bytes) -> object | None:
    """The value as pydicom reads it (UI without trailing NULs and spaces, AE stripped), None if unusual."""
    if vr == "US":
        return _US.unpack(raw)[0] if len(raw) == 2 else None
    if b"\\" in raw:
        return None  # several values: pynetdicom warns and takes the first
    text = raw.decode("iso8859")
    return text.rstrip("\0 ") if vr == "UI" else text.strip()


def _store_primitive(command: bytes | memoryview, layout: dict, command_field: int, has_data: bool) -> C_STORE | None:
    """The ``C_STORE`` primitive of a command set holding only ``layout``'s elements, or None."""
    raw = bytes(command)
    values: dict[int, bytes] = {}
    position = 0
    while position < len(raw):
        if len(raw) - position < _ELEMENT_HEADER.size:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(raw, position)
        position += _ELEMENT_HEADER.size
        if group != 0 or element not in layout or element in values or length == 0 \
                or length > len(raw) - position:
            return None
        values[element] = raw[position:position + length]
        position += length
    data_set_type = values.get(0x0800)
    if values.get(0x0100) != _US.pack(command_field) or data_set_type is None \
            or (data_set_type != _US.pack(_NO_DATA_SET)) is not has_data:
        return None
    primitive = C_STORE()
    for element, value in values.items():
        target = layout[element]
        if target is None:
            continue
        keyword, vr = target
        decoded = _decoded(vr, value)
        if decoded is None:
            return None
        if vr == "UI" and len(decoded) <= 64 and _CONFORMANT_UID.fullmatch(decoded):
            setattr(primitive, _UID_SLOTS[keyword], UID(decoded, validation_mode=pydicom_config.IGNORE))
            continue
        try:
            setattr(primitive, keyword, decoded)
        except (TypeError, ValueError):
            return None
    return primitive


def store_request(command: bytes | memoryview) -> C_STORE | None:
    """The ``C_STORE`` primitive of a C-STORE-RQ command set (Implicit VR Little Endian), or None.

    The primitive has every attribute pynetdicom's decoding gives it except
    the data set and the presentation context, which the caller adds.  None
    for any other message, a request without a data set, a truncated or
    unusual command set, or a value the primitive refuses: pynetdicom then
    decodes it and reports the problem its own way.
    """
    return _store_primitive(command, _STORE_RQ_ELEMENTS, _C_STORE_RQ, has_data=True)


def store_response_of(command: bytes | memoryview) -> C_STORE | None:
    """The ``C_STORE`` primitive of a C-STORE-RSP command set, or None.

    What pynetdicom's decoding gives for the response a peer sends to each
    C-STORE sub-operation of a retrieve (or each object ``pacs push``
    sends): its Status, the Message ID it answers, and the SOP class and
    instance.  None for anything else, including a response that carries
    more (an Error Comment, an Offending Element): pynetdicom decodes those.
    """
    if len(command) > 512:  # a plain response is about 100 bytes; a longer one has more to say
        return None
    primitive = _store_primitive(command, _STORE_RSP_ELEMENTS, _C_STORE_RSP, has_data=False)
    if primitive is None or primitive.Status is None or primitive.MessageIDBeingRespondedTo is None:
        return None
    return primitive


_SHORT = struct.Struct("<HH2sH")  # Explicit VR Little Endian, 2-byte length (UI, SH, UL)
_META_VERSION = struct.pack("<HH2s2sI", 0x0002, 0x0001, b"OB", b"\0\0", 2) + b"\x00\x01"


def _meta_element(element: int, vr: bytes, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return _SHORT.pack(0x0002, element, vr, len(raw)) + raw


def part10_head(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group pynetdicom writes for a received C-STORE data set.

    The elements of ``pynetdicom.dsutils.create_file_meta`` (version 00\\01,
    media storage SOP class and instance, transfer syntax, pynetdicom's
    implementation class UID and version name), encoded as
    ``encode_file_meta`` encodes them.  Raises ``UnicodeEncodeError`` for a
    value that is not ASCII (a UID never is).
    """
    body = b"".join((
        _META_VERSION,
        _meta_element(0x0002, b"UI", sop_class_uid, b"\0"),
        _meta_element(0x0003, b"UI", sop_instance_uid, b"\0"),
        _meta_element(0x0010, b"UI", transfer_syntax_uid, b"\0"),
        _meta_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID, b"\0"),
        _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION, b" "),
    ))
    return b"\0" * 128 + b"DICM" + _SHORT.pack(0x0002, 0x0000, b"UL", 4) + _UL.pack(len(body)) + body
