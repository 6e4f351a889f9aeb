"""StoredObject: the stored bytes of a Part 10 object, sent without a parse; how its C-STORE request goes out."""

from __future__ import annotations

import io

import pydicom
import pytest
from pynetdicom.dimse_primitives import C_STORE

from pacs.net.commands import command_set
from pacs.net.reactor import encode_message
from pacs.net.stored import StoredObject, _context_for, _send_message
from pacs.synthetic import SeriesSpec, make_instance


def stored(part10: bytes) -> StoredObject:
    ds = pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True)
    return StoredObject(part10, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("implicit", [False, True])
def test_the_data_set_is_the_bytes_after_the_file_meta(implicit):
    part10 = make_instance(SeriesSpec(study_key="so", series_key="so-1", rows=16, columns=16, implicit_vr=implicit), 0)
    obj = stored(part10)
    ds = pydicom.dcmread(io.BytesIO(part10))
    # after the preamble, "DICM", the group length element (12 bytes) and the rest of the group as pydicom reads it
    meta_end = 128 + 4 + 12 + ds.file_meta.FileMetaInformationGroupLength
    assert bytes(obj.dataset_bytes()) == part10[meta_end:]
    assert pydicom.dcmread(io.BytesIO(bytes(obj.dataset_bytes())), force=True).SOPInstanceUID == ds.SOPInstanceUID
    assert obj.decoded() == ds
    assert "PixelData" not in obj and obj.SOPInstanceUID == ds.SOPInstanceUID


def test_an_object_without_file_meta_is_refused():
    part10 = make_instance(SeriesSpec(study_key="so2", series_key="so2-1", rows=8, columns=8), 0)
    with pytest.raises(ValueError, match="expected a Part 10 object"):
        stored(part10).__class__(part10[128:], sop_class_uid="1.2", sop_instance_uid="1.2.3",
                                 transfer_syntax_uid="1.2.840.10008.1.2.1").dataset_bytes()


class _Recorder:
    """The parts of an association that send_stored's helpers use, recording what is sent and how."""

    def __init__(self, *, direct: bool = True) -> None:
        self.sent_now: list[tuple] = []
        self.sent_by_dimse: list[tuple] = []
        self.lookups = 0
        outer = self

        class Dul:
            def send_encoded_now(self, pieces: list) -> bool:
                outer.sent_now.append(pieces)
                return direct

        class Dimse:
            maximum_pdu_size = 16384

            def send_msg(self, primitive, context_id):  # noqa: ANN001
                outer.sent_by_dimse.append((context_id, primitive))

        self.dul, self.dimse = Dul(), Dimse()

    def get_handlers(self, event) -> list:  # noqa: ANN001
        return []

    def _get_valid_context(self, sop_class, syntax, role, allow_conversion):  # noqa: ANN001
        self.lookups += 1
        if syntax != "1.2.840.10008.1.2.1":
            raise ValueError("no such context")
        return type("Context", (), {"context_id": 3})()


CT = "1.2.840.10008.5.1.4.1.1.2"


def test_the_request_goes_out_as_the_primitives_command_set_with_the_stored_bytes():
    assoc = _Recorder()
    data = b"data"
    _send_message(assoc, 3, memoryview(data), 12, 2, CT, "1.2.3.4", "MOVESCU", 7)
    request = C_STORE()
    request.MessageID, request.Priority, request.AffectedSOPClassUID = 12, 2, CT
    request.AffectedSOPInstanceUID, request.MoveOriginatorApplicationEntityTitle = "1.2.3.4", "MOVESCU"
    request.MoveOriginatorMessageID = 7
    expected = encode_message(3, command_set(request, has_data=True), b"data", 16384)
    assert [b"".join(pieces) for pieces in assoc.sent_now] == [expected] and not assoc.sent_by_dimse
    assert assoc.sent_now[0][-1].obj is data  # the data set is sent from the stored bytes, not a copy


@pytest.mark.parametrize("case", ["the DUL cannot send now", "an invalid originator AE", "a UID with letters"])
def test_anything_unusual_goes_through_pynetdicoms_request_primitive(case):
    assoc = _Recorder(direct=case != "the DUL cannot send now")
    aet = "BAD\\AE" if case == "an invalid originator AE" else "MOVESCU"
    instance = "1.2.3.x" if case == "a UID with letters" else "1.2.3.4"
    _send_message(assoc, 3, memoryview(b"data"), 12, 2, CT, instance, aet, 7)
    assert len(assoc.sent_by_dimse) == 1
    context_id, request = assoc.sent_by_dimse[0]
    assert context_id == 3 and request.DataSet.getvalue() == b"data" and request.MessageID == 12
    assert len(assoc.sent_now) == (1 if case == "the DUL cannot send now" else 0)


def test_the_context_is_looked_up_once_per_sop_class_and_syntax():
    assoc = _Recorder()
    assert [_context_for(assoc, CT, "1.2.840.10008.1.2.1") for _ in range(3)] == [3, 3, 3]
    assert [_context_for(assoc, CT, "1.2.840.10008.1.2.4.50") for _ in range(2)] == [None, None]
    assert assoc.lookups == 2
