"""Command sets encoded by pacs.net.commands are byte for byte what pynetdicom encodes."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta

from pacs.net.commands import command_set, data_set_of, part10_head

CT = "1.2.840.10008.5.1.4.1.1.2"
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
