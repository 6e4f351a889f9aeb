"""One matching engine for C-FIND and QIDO-RS: PS3.4 C.2.2.2 keys to indexed SQL.

Each matching type of the standard is one function:

* universal matching (C.2.2.2.3): an empty value constrains nothing;
* single value matching (C.2.2.2.1): equality;
* list of UID matching (C.2.2.2.2): ``uid1\\uid2`` becomes ``IN``;
* wild card matching (C.2.2.2.4): ``*`` and ``?`` become ``LIKE`` patterns;
* range matching (C.2.2.2.5): ``a-b``, ``-b`` and ``a-`` on DA and TM.

Matching is case-sensitive, as C.2.2.2.1 specifies for all VRs but PN (where
it is an implementation choice; this archive is case-sensitive there too).
Everything becomes a WHERE clause on indexed columns; nothing is filtered in
Python.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Select, and_, exists, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from pacs.errors import InvalidQuery
from pacs.index.models import Instance, Patient, Series, Study
from pacs.ingest.parse import normalize_time


class Level(str, enum.Enum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return list(Level).index(self)


class Kind(enum.Enum):
    TEXT = "text"  # wildcard-capable strings: LO, SH, PN, CS
    UID = "uid"  # UI: single value or list
    DATE = "date"  # DA: single value or range
    TIME = "time"  # TM: single value or range (stored normalised)
    INT = "int"  # IS/US: single value
    MODALITIES = "modalities"  # ModalitiesInStudy: any series' modality matches
    RETURN_ONLY = "return-only"  # NumberOf* and the like: never matched on


@dataclass(frozen=True)
class Attribute:
    keyword: str
    tag: int
    vr: str
    level: Level
    column: InstrumentedAttribute | None
    kind: Kind


def _a(keyword: str, tag: int, vr: str, level: Level, column, kind: Kind) -> Attribute:  # noqa: ANN001
    return Attribute(keyword, tag, vr, level, column, kind)


P, ST, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE
#: The attributes the index can match on or return, by keyword.
ATTRIBUTES: dict[str, Attribute] = {
    a.keyword: a
    for a in (
        _a("PatientID", 0x00100020, "LO", P, Patient.patient_id, Kind.TEXT),
        _a("IssuerOfPatientID", 0x00100021, "LO", P, Patient.issuer_of_patient_id, Kind.TEXT),
        _a("PatientName", 0x00100010, "PN", P, Patient.patient_name, Kind.TEXT),
        _a("PatientBirthDate", 0x00100030, "DA", P, Patient.patient_birth_date, Kind.DATE),
        _a("PatientSex", 0x00100040, "CS", P, Patient.patient_sex, Kind.TEXT),
        _a("NumberOfPatientRelatedStudies", 0x00201200, "IS", P, Patient.num_studies, Kind.RETURN_ONLY),
        _a("NumberOfPatientRelatedSeries", 0x00201202, "IS", P, Patient.num_series, Kind.RETURN_ONLY),
        _a("NumberOfPatientRelatedInstances", 0x00201204, "IS", P, Patient.num_instances, Kind.RETURN_ONLY),
        _a("StudyInstanceUID", 0x0020000D, "UI", ST, Study.study_instance_uid, Kind.UID),
        _a("StudyDate", 0x00080020, "DA", ST, Study.study_date, Kind.DATE),
        _a("StudyTime", 0x00080030, "TM", ST, Study.study_time, Kind.TIME),
        _a("AccessionNumber", 0x00080050, "SH", ST, Study.accession_number, Kind.TEXT),
        _a("StudyID", 0x00200010, "SH", ST, Study.study_id, Kind.TEXT),
        _a("StudyDescription", 0x00081030, "LO", ST, Study.study_description, Kind.TEXT),
        _a("ReferringPhysicianName", 0x00080090, "PN", ST, Study.referring_physician_name, Kind.TEXT),
        _a("ModalitiesInStudy", 0x00080061, "CS", ST, Study.modalities_in_study, Kind.MODALITIES),
        _a("NumberOfStudyRelatedSeries", 0x00201206, "IS", ST, Study.num_series, Kind.RETURN_ONLY),
        _a("NumberOfStudyRelatedInstances", 0x00201208, "IS", ST, Study.num_instances, Kind.RETURN_ONLY),
        _a("SeriesInstanceUID", 0x0020000E, "UI", SE, Series.series_instance_uid, Kind.UID),
        _a("Modality", 0x00080060, "CS", SE, Series.modality, Kind.TEXT),
        _a("SeriesNumber", 0x00200011, "IS", SE, Series.series_number, Kind.INT),
        _a("SeriesDescription", 0x0008103E, "LO", SE, Series.series_description, Kind.TEXT),
        _a("BodyPartExamined", 0x00180015, "CS", SE, Series.body_part_examined, Kind.TEXT),
        _a("SeriesDate", 0x00080021, "DA", SE, Series.series_date, Kind.DATE),
        _a("SeriesTime", 0x00080031, "TM", SE, Series.series_time, Kind.TIME),
        _a("FrameOfReferenceUID", 0x00200052, "UI", SE, Series.frame_of_reference_uid, Kind.UID),
        _a("NumberOfSeriesRelatedInstances", 0x00201209, "IS", SE, Series.num_instances, Kind.RETURN_ONLY),
        _a("SOPInstanceUID", 0x00080018, "UI", IM, Instance.sop_instance_uid, Kind.UID),
        _a("SOPClassUID", 0x00080016, "UI", IM, Instance.sop_class_uid, Kind.UID),
        _a("InstanceNumber", 0x00200013, "IS", IM, Instance.instance_number, Kind.INT),
        _a("Rows", 0x00280010, "US", IM, Instance.rows, Kind.INT),
        _a("Columns", 0x00280011, "US", IM, Instance.columns, Kind.INT),
        _a("NumberOfFrames", 0x00280008, "IS", IM, Instance.number_of_frames, Kind.INT),
        _a("TransferSyntaxUID", 0x00020010, "UI", IM, Instance.transfer_syntax_uid, Kind.UID),
        _a("AvailableTransferSyntaxUID", 0x00083002, "UI", IM, Instance.transfer_syntax_uid, Kind.UID),
    )
}
BY_TAG: dict[int, Attribute] = {a.tag: a for a in ATTRIBUTES.values()}

#: The unique key of each level (PS3.4 C.6.1.1 / C.6.2.1).
UNIQUE_KEYS: dict[Level, str] = {
    P: "PatientID",
    ST: "StudyInstanceUID",
    SE: "SeriesInstanceUID",
    IM: "SOPInstanceUID",
}
ENTITIES = {P: Patient, ST: Study, SE: Series, IM: Instance}
LEVELS = [P, ST, SE, IM]


def attribute(keyword: str) -> Attribute:
    try:
        return ATTRIBUTES[keyword]
    except KeyError:
        raise InvalidQuery(
            f"unsupported matching key {keyword!r}; supported: {', '.join(sorted(ATTRIBUTES))}"
        ) from None


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def universal(value: str) -> bool:
    """C.2.2.2.3: a zero-length value, or a lone ``*``, matches everything."""
    return value == "" or value == "*"


def single_value(column, value: str) -> ColumnElement[bool]:  # noqa: ANN001
    return column == value


def uid_list(column, value: str) -> ColumnElement[bool]:  # noqa: ANN001
    uids = [uid.strip() for uid in value.split("\\") if uid.strip()]
    bad = [uid for uid in uids if len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid)]
    if bad:
        raise InvalidQuery(f"not a UID: {bad[0]!r} (expected digits and dots, at most 64 characters)")
    return column == uids[0] if len(uids) == 1 else column.in_(uids)


def wildcard(column, value: str) -> ColumnElement[bool]:  # noqa: ANN001
    return column.like(_like_pattern(value), escape="\\")


def _check_date(value: str, keyword: str) -> str:
    value = value.strip().replace(".", "")  # ACR-NEMA style YYYY.MM.DD
    if len(value) != 8 or not value.isdigit():
        raise InvalidQuery(f"{keyword}: expected a date YYYYMMDD, got {value!r}")
    return value


def _check_time(value: str, keyword: str, *, upper: bool) -> str:
    raw = value.strip().replace(":", "")
    whole = raw.split(".")[0]
    if not whole.isdigit() or len(whole) not in (2, 4, 6):
        raise InvalidQuery(f"{keyword}: expected a time HH[MM[SS[.F]]], got {value!r}")
    if upper and "." not in raw:
        # An upper bound of "1300" includes the whole minute 13:00 (PS3.4 C.2.2.2.5).
        return whole + "5959"[: 6 - len(whole)] + ".999999"
    return normalize_time(raw)


def date_range(column, value: str, keyword: str) -> ColumnElement[bool]:  # noqa: ANN001
    if "-" not in value:
        return column == _check_date(value, keyword)
    low, _, high = value.partition("-")
    clauses = [column != ""]  # an empty stored value lies in no range
    if low.strip():
        clauses.append(column >= _check_date(low, keyword))
    if high.strip():
        clauses.append(column <= _check_date(high, keyword))
    if len(clauses) == 1:
        raise InvalidQuery(f"{keyword}: a range needs at least one bound, got {value!r}")
    return and_(*clauses)


def time_range(column, value: str, keyword: str) -> ColumnElement[bool]:  # noqa: ANN001
    if "-" not in value:
        low = _check_time(value, keyword, upper=False)
        high = _check_time(value, keyword, upper=True)
        return and_(column >= low, column <= high)
    low, _, high = value.partition("-")
    clauses = [column != ""]
    if low.strip():
        clauses.append(column >= _check_time(low, keyword, upper=False))
    if high.strip():
        clauses.append(column <= _check_time(high, keyword, upper=True))
    if len(clauses) == 1:
        raise InvalidQuery(f"{keyword}: a range needs at least one bound, got {value!r}")
    return and_(*clauses)


def modalities(value: str) -> ColumnElement[bool]:
    """ModalitiesInStudy: the study has a series whose Modality matches any listed value."""
    options = []
    for item in filter(None, (v.strip() for v in value.split("\\"))):
        options.append(wildcard(Series.modality, item) if _has_wildcard(item) else Series.modality == item)
    return exists().where(Series.study_fk == Study.id, or_(*options))


def clause(attr: Attribute, value: str) -> ColumnElement[bool] | None:
    """The WHERE clause matching ``value`` on ``attr``, or None for universal matching."""
    value = value.strip() if attr.kind is not Kind.TEXT else value.rstrip(" ")
    if attr.kind is Kind.RETURN_ONLY or universal(value):
        return None
    if attr.kind is Kind.UID:
        if _has_wildcard(value):
            raise InvalidQuery(f"{attr.keyword}: wildcards are not allowed in UIDs, got {value!r}")
        return uid_list(attr.column, value)
    if attr.kind is Kind.DATE:
        return date_range(attr.column, value, attr.keyword)
    if attr.kind is Kind.TIME:
        return time_range(attr.column, value, attr.keyword)
    if attr.kind is Kind.INT:
        try:
            return attr.column == int(value)
        except ValueError:
            raise InvalidQuery(f"{attr.keyword}: expected an integer, got {value!r}") from None
    if attr.kind is Kind.MODALITIES:
        return modalities(value)
    if _has_wildcard(value):
        return wildcard(attr.column, value)
    return single_value(attr.column, value)


def build_query(level: Level, identifier: Mapping[str, str]) -> Select:
    """SELECT the entities of ``level`` matching every key of ``identifier``.

    Keys of the query level and the levels above it may constrain; a key of
    a lower level is an error (PS3.4 C.4.1.1.3.1).  Each row is the level's
    entity followed by its parents up to the patient (``(Series, Study,
    Patient)`` at SERIES level), so their attributes can be returned without
    further queries; ``session.scalars`` yields the level's entity alone.
    """
    entity = ENTITIES[level]
    # The level's entity first (``session.scalars`` gives just it), then its parents.
    query = select(entity, *(ENTITIES[up] for up in reversed(LEVELS[: level.depth])))
    # Join upwards: Instance -> Series -> Study -> Patient.
    if level.depth >= IM.depth:
        query = query.join(Series, Instance.series_fk == Series.id)
    if level.depth >= SE.depth:
        query = query.join(Study, Series.study_fk == Study.id)
    if level.depth >= ST.depth:
        query = query.join(Patient, Study.patient_fk == Patient.id)
    for keyword, value in identifier.items():
        attr = attribute(keyword)
        if attr.level.depth > level.depth:
            raise InvalidQuery(
                f"{keyword} is a {attr.level.value}-level key, below the query level {level.value}"
            )
        condition = clause(attr, value if value is not None else "")
        if condition is not None:
            query = query.where(condition)
    return query.order_by(entity.id)
