"""StoredObject: the stored bytes of a Part 10 object, sent without a parse."""

from __future__ import annotations

import io

import pydicom
import pytest

from pacs.net.stored import StoredObject
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
