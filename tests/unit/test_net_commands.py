"""Command sets encoded by pacs.net.commands are byte for byte what pynetdicom encodes; C-STORE requests decode as pynetdicom decodes them."""

from __future__ import annotations

import hashlib
import queue
import struct
from io import BytesIO
from types import SimpleNamespace

import pytest
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

from pacs.net import commands
from pacs.net.commands import command_set, data_set_of, part10_head
from pacs.net.reactor import _StoreRequestReceiver

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
INSTANCE = "1.2.826.0.1.3680043.10.1484.1234567890123456789"  # odd length: padded with a NUL


def pynetdicom_bytes(primitive) -> bytes:
    table = _RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None else _RSP_TO_MESSAGE
    message = table[type(primitive)]()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def store_request(**extra) -> C_STORE:
    p = C_STORE()
    p.MessageID, p.Priority, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID = 7, 2, CT, INSTANCE
    p.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    for name, value in extra.items():
        setattr(p, name, value)
    return p


def store_response(status: int = 0x0000) -> C_STORE:
    p = C_STORE()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.AffectedSOPInstanceUID, p.Status = 7, CT, INSTANCE, status
    return p


def retrieve_response(kind, status: int, *, counts=(3, 5, 1, 0), identifier: bytes | None = None):
    p = kind()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 65535, STUDY_ROOT_GET, status
    if counts is not None:
        (p.NumberOfRemainingSuboperations, p.NumberOfCompletedSuboperations,
         p.NumberOfFailedSuboperations, p.NumberOfWarningSuboperations) = counts
    if identifier is not None:
        p.Identifier = BytesIO(identifier)
    return p


def find_response(status: int, identifier: bytes | None) -> C_FIND:
    p = C_FIND()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 3, "1.2.840.10008.5.1.4.1.2.2.1", status
    if identifier is not None:
        p.Identifier = BytesIO(identifier)
    return p


def echo_response() -> C_ECHO:
    p = C_ECHO()
    p.MessageIDBeingRespondedTo, p.AffectedSOPClassUID, p.Status = 1, "1.2.840.10008.1.1", 0
    return p


CASES = {
    "C-STORE-RQ": store_request(),
    "C-STORE-RQ, a C-MOVE sub-operation": store_request(MoveOriginatorApplicationEntityTitle="MOVESCU",
                                                         MoveOriginatorMessageID=12),
    "C-STORE-RQ, odd-length originator AE": store_request(MoveOriginatorApplicationEntityTitle="ABC",
                                                          MoveOriginatorMessageID=1),
    "C-STORE-RSP, success": store_response(),
    "C-STORE-RSP, warning": store_response(0xB000),
    "C-GET-RSP, pending": retrieve_response(C_GET, 0xFF00),
    "C-GET-RSP, final": retrieve_response(C_GET, 0x0000, counts=(None, 5, 0, 0)),
    "C-GET-RSP, failed with failed-UID list": retrieve_response(C_GET, 0xB000, counts=(None, 4, 1, 0),
                                                                identifier=b"\x08\x00\x58\x11\x00\x00\x00\x00"),
    "C-MOVE-RSP, pending": retrieve_response(C_MOVE, 0xFF00),
    "C-MOVE-RSP, no counts": retrieve_response(C_MOVE, 0xA801, counts=None),
    "C-FIND-RSP, pending with identifier": find_response(0xFF00, b"\x08\x00\x52\x00\x06\x00\x53\x54\x55\x44\x59\x20"),
    "C-FIND-RSP, final": find_response(0x0000, None),
    "C-ECHO-RSP": echo_response(),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_bytes_as_pynetdicom(name):
    primitive = CASES[name]
    assert command_set(primitive) == pynetdicom_bytes(primitive)


def test_data_set_is_the_primitives():
    assert data_set_of(store_request()).getvalue() == b"\x08\x00\x16\x00\x00\x00\x00\x00"
    assert data_set_of(store_response()) is None
    assert data_set_of(retrieve_response(C_GET, 0xFF00)) is None


def test_values_left_to_pynetdicom():
    failure = store_response(0xC000)
    failure.ErrorComment = "cannot parse"
    assert command_set(failure) is None  # an Error Comment: pynetdicom's path
    by_path = store_request()
    by_path._dataset_path = ("/tmp/x.dcm", 132)  # pynetdicom streams such a file itself
    assert command_set(by_path) is None


def test_data_set_sent_from_elsewhere():
    request = store_request()
    expected = pynetdicom_bytes(request)
    request.DataSet = None  # the caller sends the stored bytes beside the command set
    assert command_set(request, has_data=True) == expected
    assert command_set(request) != expected  # without it: "no data set follows"


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50",
                                    "1.2.840.10008.1.2.4.90"])
@pytest.mark.parametrize("instance", [INSTANCE, INSTANCE + "1"])
def test_file_meta_as_pynetdicom_encodes_it(syntax, instance):
    meta = create_file_meta(sop_class_uid=CT, sop_instance_uid=instance, transfer_syntax=syntax)
    assert part10_head(CT, instance, syntax) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)


PRIMITIVE_ATTRIBUTES = ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                        "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


def pynetdicom_decoded(command: bytes, data: bytes = b"") -> C_STORE:
    """What pynetdicom's DIMSE layer makes of a C-STORE-RQ arriving as two PDVs."""
    message = DIMSEMessage()
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x03" + command], [1, b"\x02" + data]]
    assert message.decode_msg(primitive)
    return message.message_to_primitive()


@pytest.mark.parametrize("extra", [{}, {"MoveOriginatorApplicationEntityTitle": "MOVESCU", "MoveOriginatorMessageID": 9},
                                   {"AffectedSOPInstanceUID": "1.2.3.4"}, {"Priority": 0, "MessageID": 65535},
                                   {"AffectedSOPInstanceUID": "1.2.03.4"}])  # not conformant: the setter's way
def test_a_store_request_decodes_as_pynetdicom_decodes_it(extra):
    command = command_set(store_request(**extra))
    ours, theirs = commands.store_request(command), pynetdicom_decoded(command)
    assert ours is not None
    assert {a: getattr(ours, a) for a in PRIMITIVE_ATTRIBUTES} == {a: getattr(theirs, a) for a in PRIMITIVE_ATTRIBUTES}
    assert ours.AffectedSOPInstanceUID == extra.get("AffectedSOPInstanceUID", INSTANCE)
    assert type(ours.AffectedSOPInstanceUID) is type(theirs.AffectedSOPInstanceUID) is UID
    assert type(ours.AffectedSOPClassUID) is UID


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


@pytest.mark.parametrize("case", ["echo", "store response", "no data set", "truncated", "unknown element",
                                  "two values", "empty value", "bad priority"])
def test_what_the_store_decoder_leaves_to_pynetdicom(case):
    command = command_set(store_request())
    if case == "echo":
        echo = C_ECHO()
        echo.MessageID, echo.AffectedSOPClassUID = 1, "1.2.840.10008.1.1"
        command = command_set(echo)
    elif case == "store response":
        command = command_set(store_response())
    elif case == "no data set":
        command = command_set(store_request(), has_data=False)
    elif case == "truncated":
        command = command[:-3]
    elif case == "unknown element":
        command += _element(0x0902, b"a comment ")  # Error Comment: no C-STORE-RQ element
    elif case == "two values":
        command = command_set(store_request(AffectedSOPInstanceUID="1.2.3.4")).replace(b"1.2.3.4\0", b"1.2\\1.34")
    elif case == "empty value":
        command += _element(0x1030, b"")
    elif case == "bad priority":
        command = command.replace(struct.pack("<HHIH", 0, 0x0700, 2, 2), struct.pack("<HHIH", 0, 0x0700, 2, 7))
    assert commands.store_request(command) is None


class _Dimse:
    """The parts of pynetdicom's DIMSEServiceProvider the receiver uses, recording what it hands on."""

    def __init__(self) -> None:
        self.message = None
        self.msg_queue: queue.Queue = queue.Queue()
        self.by_pynetdicom: list[list] = []
        self.assoc = SimpleNamespace(get_handlers=lambda event: [], requestor=SimpleNamespace(ae_title="TESTSCU"),
                                     _accepted_cx={3: SimpleNamespace(transfer_syntax=[EXPLICIT])},
                                     ae=SimpleNamespace(max_received_object_bytes=None))
        self.dul = SimpleNamespace(event_queue=queue.Queue())

    def receive_primitive(self, primitive) -> None:
        self.by_pynetdicom.append(list(primitive.presentation_data_value_list))


def _p_data(*values) -> P_DATA:
    primitive = P_DATA()
    primitive.presentation_data_value_list = list(values)
    return primitive


def test_the_receiver_assembles_a_store_request_and_hands_the_next_message_on():
    dimse = _Dimse()
    receive = _StoreRequestReceiver(dimse)
    command = command_set(store_request())
    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 2, "1.2.840.10008.1.1"
    echo_command = b"\x03" + command_set(echo)
    receive(_p_data([3, b"\x03" + command], [3, b"\x00" + b"first "]))
    assert dimse.msg_queue.empty()
    receive(_p_data([3, b"\x02" + b"last"], [1, echo_command]))  # the next message starts in the same P-DATA
    context_id, request = dimse.msg_queue.get_nowait()
    assert context_id == 3 and request.DataSet.getvalue() == b"first last"
    assert request.AffectedSOPInstanceUID == INSTANCE and request.MessageID == 7
    assert dimse.by_pynetdicom == [[[1, echo_command]]]
    # hashed as it arrived: the Part 10 head of the accepted context's transfer syntax, then the data set
    assert request._pacs_head == part10_head(request.AffectedSOPClassUID, INSTANCE, EXPLICIT)
    assert request._pacs_sha256 == hashlib.sha256(request._pacs_head + b"first last").hexdigest()


def test_a_request_under_a_context_not_accepted_is_not_hashed_by_the_receiver():
    dimse = _Dimse()
    receive = _StoreRequestReceiver(dimse)
    receive(_p_data([5, b"\x03" + command_set(store_request())], [5, b"\x02" + b"data"]))
    _, request = dimse.msg_queue.get_nowait()
    assert request.DataSet.getvalue() == b"data"
    assert not hasattr(request, "_pacs_sha256") and not hasattr(request, "_pacs_head")


def test_a_command_fragment_inside_a_data_set_ends_the_association():
    dimse = _Dimse()
    receive = _StoreRequestReceiver(dimse)
    receive(_p_data([3, b"\x03" + command_set(store_request())], [3, b"\x00" + b"part"]))
    receive(_p_data([3, b"\x03" + command_set(store_request())]))
    assert dimse.msg_queue.empty() and dimse.dul.event_queue.get_nowait() == "Evt19"


def test_the_receiver_leaves_a_message_pynetdicom_has_begun_to_pynetdicom():
    dimse = _Dimse()
    dimse.message = C_STORE_RQ()  # pynetdicom is in the middle of a message
    receive = _StoreRequestReceiver(dimse)
    values = [[3, b"\x00" + b"data"]]
    receive(_p_data(*values))
    assert dimse.by_pynetdicom == [values] and dimse.msg_queue.empty()


@pytest.mark.parametrize("instance, status", [(INSTANCE, 0x0000), ("1.2.3.4", 0xB007), (INSTANCE, 0xA700)])
def test_a_store_response_is_what_pynetdicom_sends_for_the_primitive_its_scp_builds(instance, status):
    rsp = C_STORE()  # as pynetdicom's StorageServiceClass.SCP fills it
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPInstanceUID, rsp.AffectedSOPClassUID, rsp.Status = instance, CT, status
    assert commands.store_response(7, CT, instance, status) == pynetdicom_bytes(rsp)
    assert commands.store_response(7, CT, "1.2.3.\u00e9", status) is None


RESPONSE_ATTRIBUTES = ("MessageIDBeingRespondedTo", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Status")


def pynetdicom_decoded_response(command: bytes) -> C_STORE:
    message = DIMSEMessage()
    assert message.decode_msg(_p_data([1, b"\x03" + command]))
    return message.message_to_primitive()


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC000])
@pytest.mark.parametrize("instance", [INSTANCE, INSTANCE + "1"])
def test_a_store_response_decodes_as_pynetdicom_decodes_it(status, instance):
    response = store_response(status)
    response.AffectedSOPInstanceUID = instance
    command = command_set(response)
    ours, theirs = commands.store_response_of(command), pynetdicom_decoded_response(command)
    assert type(ours) is C_STORE and ours.MessageIDBeingRespondedTo == 7 and ours.Status == status
    assert {a: getattr(ours, a) for a in RESPONSE_ATTRIBUTES} == {a: getattr(theirs, a) for a in RESPONSE_ATTRIBUTES}


@pytest.mark.parametrize("case", ["request", "error comment", "offending element", "no status", "with data set",
                                  "truncated", "find response"])
def test_what_the_response_decoder_leaves_to_pynetdicom(case):
    command = command_set(store_response(0xC000))
    if case == "request":
        command = command_set(store_request())
    elif case == "error comment":
        command += _element(0x0902, b"disk full ")
    elif case == "offending element":
        command += _element(0x0901, struct.pack("<HH", 0x0010, 0x0010))
    elif case == "no status":
        command = command.replace(struct.pack("<HHIH", 0, 0x0900, 2, 0xC000), b"")
    elif case == "with data set":
        command = command.replace(struct.pack("<HHIH", 0, 0x0800, 2, 0x0101), struct.pack("<HHIH", 0, 0x0800, 2, 1))
    elif case == "truncated":
        command = command[:-3]
    elif case == "find response":
        command = command_set(find_response(0x0000, None))
    assert commands.store_response_of(command) is None


def test_the_receiver_queues_store_responses_and_hands_anything_else_on():
    dimse = _Dimse()
    receive = _StoreRequestReceiver(dimse)
    plain, with_comment = command_set(store_response(0x0000)), command_set(store_response(0xC000))
    with_comment += _element(0x0902, b"disk full ")
    receive(_p_data([5, b"\x03" + plain], [5, b"\x03" + with_comment]))
    context_id, response = dimse.msg_queue.get_nowait()
    assert context_id == 5 and response.Status == 0x0000 and response.AffectedSOPInstanceUID == INSTANCE
    assert dimse.msg_queue.empty()
    assert dimse.by_pynetdicom == [[[5, b"\x03" + with_comment]]]


@pytest.mark.parametrize("extra", [{}, {"MoveOriginatorApplicationEntityTitle": "MOVESCU", "MoveOriginatorMessageID": 9},
                                   {"MoveOriginatorApplicationEntityTitle": "ABC", "MoveOriginatorMessageID": 65535},
                                   {"Priority": 0, "MessageID": 65535}])
def test_a_store_request_command_from_values_is_the_primitives_command_set(extra):
    request = store_request(**extra)
    assert commands.store_request_command(
        request.MessageID, request.Priority, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID,
        request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID,
    ) == command_set(request) == pynetdicom_bytes(request)
