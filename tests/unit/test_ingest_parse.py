"""The one-walk attribute reader agrees with pydicom's full parse."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from pacs.errors import InvalidObject
from pacs.ingest.parse import check_structure, parse_attributes, read_attributes
from pacs.synthetic import SeriesSpec, make_instance

PYDICOM_TEST_FILES = sorted(
    p for p in (Path(pydicom.__file__).parent / "data" / "test_files").rglob("*") if p.is_file()
)


def _both(data: bytes):
    fp = io.BytesIO(data)
    transfer_syntax = check_structure(fp, len(data))
    return read_attributes(io.BytesIO(data), len(data)), parse_attributes(fp, transfer_syntax)


def test_agrees_with_pydicom_on_its_own_test_files() -> None:
    compared = 0
    for path in PYDICOM_TEST_FILES:
        data = path.read_bytes()
        try:
            check_structure(io.BytesIO(data), len(data))
        except InvalidObject:
            continue  # not Part 10, or malformed: rejected before attributes are read
        try:
            fast = read_attributes(io.BytesIO(data), len(data))
        except InvalidObject as exc:
            fast = str(exc)
        try:
            slow = parse_attributes(io.BytesIO(data), check_structure(io.BytesIO(data), len(data)))
        except InvalidObject as exc:
            slow = str(exc)
        assert fast == slow, path.name
        compared += 1
    assert compared >= 100  # the wheel ships ~140 Part 10 files


def _reencoded(ds: pydicom.Dataset, transfer_syntax: str, **changes: object) -> bytes:
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, force_encoding=True,  # the dataset keeps its preamble and file meta
             little_endian=transfer_syntax != ExplicitVRBigEndian, implicit_vr=transfer_syntax == ImplicitVRLittleEndian)
    return buffer.getvalue()


@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"])
def test_agrees_across_encodings_and_character_sets(transfer_syntax: str) -> None:
    base = pydicom.dcmread(io.BytesIO(make_instance(SeriesSpec(rows=8, columns=8), 3)))
    cases = [
        {},
        {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jürgen"},
        {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Wang^XiaoDong=王^小東", "StudyDescription": "Kopf ÄÖÜ"},
        {"SpecificCharacterSet": "ISO 2022 IR 87", "PatientName": "Yamada^Tarou=山田^太郎"},
        {"InstanceNumber": "", "SeriesNumber": None, "Modality": "CT", "AccessionNumber": " A1 "},
        {"StudyTime": "10:15:00", "SeriesTime": "101500.123"},
    ]
    for changes in cases:
        fast, slow = _both(_reencoded(pydicom.dcmread(io.BytesIO(base_bytes(base))), transfer_syntax, **changes))
        assert fast == slow, changes
    fast, _ = _both(_reencoded(base, transfer_syntax, SpecificCharacterSet="ISO_IR 192", PatientName="Wang^XiaoDong=王^小東"))
    assert fast.patient_name == "Wang^XiaoDong=王^小東"
    assert fast.rows == 8 and fast.columns == 8 and fast.instance_number == 4


def base_bytes(ds: pydicom.Dataset, *, enforce_file_format: bool = True) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=enforce_file_format)  # False keeps a wrong file meta as it is
    return buffer.getvalue()


def test_missing_uid_and_meta_mismatch_are_refused() -> None:
    ds = pydicom.dcmread(io.BytesIO(make_instance(SeriesSpec(rows=8, columns=8), 0)))
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidObject, match="missing required SeriesInstanceUID"):
        read_attributes(io.BytesIO(data := base_bytes(ds)), len(data))
    ds = pydicom.dcmread(io.BytesIO(make_instance(SeriesSpec(rows=8, columns=8), 0)))
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    with pytest.raises(InvalidObject, match="MediaStorageSOPInstanceUID 1.2.3 differs"):
        read_attributes(io.BytesIO(data := base_bytes(ds, enforce_file_format=False)), len(data))
