"""C-FIND / C-MOVE / C-GET identifiers: parse request datasets, build responses.

PS3.4 C.4.1.1.3: an identifier holds the QueryRetrieveLevel, matching keys
(with values) and return keys (empty).  Every attribute the index knows is a
matching key; attributes it does not know are returned zero-length, as PS3.4
C.4.1.1.3.2 allows for optional keys the SCP does not support.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue

from pacs.errors import InvalidQuery
from pacs.query.matching import ATTRIBUTES, UNIQUE_KEYS, Level, build_query

#: Elements of an identifier that are not keys.
NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC", "QueryRetrieveView"}


class InformationModel(str, enum.Enum):
    PATIENT_ROOT = "patient-root"
    STUDY_ROOT = "study-root"

    @property
    def levels(self) -> tuple[Level, ...]:
        if self is InformationModel.STUDY_ROOT:
            return (Level.STUDY, Level.SERIES, Level.IMAGE)
        return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)


@dataclass
class Query:
    level: Level
    matching: dict[str, str] = field(default_factory=dict)
    #: Every key of the request, in order, to be present in each response.
    requested: list[str] = field(default_factory=list)
    #: Keys the index does not hold, returned zero-length, by tag.
    unsupported: list[int] = field(default_factory=list)

    def statement(self):  # noqa: ANN201
        return build_query(self.level, self.matching)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def parse_identifier(identifier: Dataset, model: InformationModel) -> Query:
    """A :class:`Query` from a request identifier; :class:`InvalidQuery` names what is wrong."""
    raw_level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    try:
        level = Level(raw_level)
    except ValueError:
        raise InvalidQuery(
            f"QueryRetrieveLevel must be one of {', '.join(lv.value for lv in model.levels)}, got {raw_level!r}"
        ) from None
    if level not in model.levels:
        raise InvalidQuery(f"QueryRetrieveLevel {level.value} is not part of the {model.value} model")
    query = Query(level)
    for element in identifier:
        keyword = element.keyword or keyword_for_tag(element.tag)
        if keyword in NOT_KEYS or element.tag.group == 0x0002:
            continue
        if element.VR == "SQ":
            query.unsupported.append(int(element.tag))
            continue
        attribute = ATTRIBUTES.get(keyword)
        if attribute is None:
            query.unsupported.append(int(element.tag))
            continue
        if attribute.level.depth > level.depth:
            raise InvalidQuery(
                f"{keyword} is a {attribute.level.value}-level key, below the query level {level.value}"
            )
        query.requested.append(keyword)
        value = _text(element.value).strip("\x00")
        if value:
            query.matching[keyword] = value
    return query


def response_identifier(query: Query, row: tuple, *, retrieve_ae: str = "") -> Dataset:
    """The C-FIND response identifier for one matched row (entity, then its parents)."""
    by_level = {type(entity).__name__: entity for entity in row}
    out = Dataset()
    out.QueryRetrieveLevel = query.level.value
    keywords = list(query.requested)
    for level in (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)[: query.level.depth + 1]:
        unique = UNIQUE_KEYS[level]
        if unique not in keywords and (level is query.level or level is not Level.PATIENT):
            keywords.append(unique)  # unique keys at and above the level are always returned
    for keyword in keywords:
        attribute = ATTRIBUTES[keyword]
        entity = by_level.get(attribute.column.class_.__name__)
        value = getattr(entity, attribute.column.key) if entity is not None else None
        vr = dictionary_VR(attribute.tag)
        if value is None:
            value = None if vr in ("US", "UL", "SS", "SL") else ""
        elif isinstance(value, int) and vr == "IS":
            value = str(value)
        if vr in ("CS", "UI") and isinstance(value, str) and "\\" in value:
            value = value.split("\\")
        setattr(out, keyword, value)
    for tag in query.unsupported:
        out.add_new(tag, dictionary_VR(tag) if _known(tag) else "UN", None)
    if retrieve_ae:
        out.RetrieveAETitle = retrieve_ae
    return out


def _known(tag: int) -> bool:
    try:
        dictionary_VR(tag)
    except KeyError:
        return False
    return True
