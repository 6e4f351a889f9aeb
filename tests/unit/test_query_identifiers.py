"""C-FIND response identifiers: the pre-encoded fast path writes what pydicom would."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from pacs.query.identifiers import InformationModel, parse_identifier, response_plan


def _request() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = "1.2.3"
    ds.Modality = ""
    ds.SeriesNumber = ""
    ds.SeriesDescription = ""
    ds.ModalitiesInStudy = ""
    ds.NumberOfSeriesRelatedInstances = ""
    ds.PatientName = ""
    ds.add_new(0x00181030, "LO", "")  # ProtocolName: not in the index, returned empty
    ds.add_new(0x00081110, "SQ", [])  # ReferencedStudySequence: a sequence, returned empty
    return ds


def _reference(plan, row) -> Dataset:
    """The same identifier built through pydicom's ordinary API."""
    ds = Dataset()
    ds.QueryRetrieveLevel = plan.query.level.value
    for attribute, value in zip(plan.attributes, row):
        if value is None:
            value = None if attribute.vr == "US" else ""
        elif attribute.vr == "IS":
            value = str(value)
        elif attribute.vr in ("CS", "UI") and "\\" in value:
            value = value.split("\\")
        ds.add_new(attribute.tag, attribute.vr, value)
    ds.add_new(0x00181030, "LO", None)
    ds.add_new(0x00081110, "SQ", [])
    return ds


KEYS = ("StudyInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "ModalitiesInStudy",
        "NumberOfSeriesRelatedInstances", "PatientName", "SeriesInstanceUID")
ROWS = {
    "ascii": ("1.2.3", "CT", 7, "AXIAL 1mm", "CT\\MR", 12, "DOE^JANE", "1.2.3.45"),
    "odd lengths and empties": ("1.2.33", "MR", None, "", "MR", 0, "", "1.2.3.4"),
    "non-ASCII text": ("1.2.3", "CT", 1, "Kopf", "CT", 3, "Müller^Jürgen", "1.2.3.4"),
}


@pytest.mark.parametrize("implicit, little", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("name", list(ROWS))
def test_fast_identifier_encodes_like_pydicom(name, implicit, little) -> None:
    plan = response_plan(parse_identifier(_request(), InformationModel.STUDY_ROOT))
    keywords = [a.keyword for a in plan.attributes]
    assert sorted(keywords) == sorted(KEYS)  # what was asked, plus the unique key of the level
    row = tuple(dict(zip(KEYS, ROWS[name]))[keyword] for keyword in keywords)
    fast = encode(plan.identifier(row, implicit_vr=implicit, little_endian=little), implicit, little)
    assert fast is not None
    assert fast == encode(_reference(plan, row), implicit, little)


@pytest.mark.parametrize("implicit, little", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("name", list(ROWS))
def test_directly_encoded_identifier_is_what_pydicom_writes(name, implicit, little) -> None:
    plan = response_plan(parse_identifier(_request(), InformationModel.STUDY_ROOT))
    row = tuple(dict(zip(KEYS, ROWS[name]))[a.keyword] for a in plan.attributes)
    direct = plan.encoded(row, implicit_vr=implicit, little_endian=little)
    if name == "non-ASCII text":
        assert direct is None  # the character set is pydicom's business: identifier() is encoded instead
        return
    assert direct == encode(_reference(plan, row), implicit, little)
