"""C-FIND / C-MOVE / C-GET identifiers: parse request datasets, build responses.

PS3.4 C.4.1.1.3: an identifier holds the QueryRetrieveLevel, matching keys
(with values) and return keys (empty).  Every attribute the index knows is a
matching key; attributes it does not know are returned zero-length, as PS3.4
C.4.1.1.3.2 allows for optional keys the SCP does not support.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydicom import config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import Tag
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue

from pacs.errors import InvalidQuery
from pacs.query.matching import ATTRIBUTES, UNIQUE_KEYS, Attribute, Level, build_query

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


@dataclass(frozen=True)
class ResponsePlan:
    """What each C-FIND response of a query holds: the columns to select and how to encode them.

    Computed once per query; the statement selects exactly these columns, so
    rows are plain tuples and no ORM objects are built for thousands of matches.
    """

    query: Query
    attributes: tuple[Attribute, ...]

    def statement(self):  # noqa: ANN201
        return self.query.statement().with_only_columns(*(a.column for a in self.attributes))

    def identifier(self, row: tuple, *, implicit_vr: bool = True, little_endian: bool = True) -> Dataset:
        """The response identifier of one selected row, for a context of the given encoding.

        Values come from the index, checked when they were stored.  ASCII text
        and integers are put in already encoded (pydicom then writes them
        without converting or validating each value again: most of the cost
        of a large C-FIND); anything else goes through pydicom's encoder.
        """
        out = Dataset()
        out.set_original_encoding(implicit_vr, little_endian, "iso8859")
        order = "little" if little_endian else "big"
        _put(out, 0x00080052, "CS", self.query.level.value, order)
        for attribute, value in zip(self.attributes, row):
            _put(out, attribute.tag, attribute.vr, value, order)
        for tag in self.query.unsupported:
            out.add_new(tag, dictionary_VR(tag) if _known(tag) else "UN", None)
        return out

    @cached_property
    def _layout(self) -> tuple[tuple[int, str, int | None], ...]:
        """(tag, VR, index of the row value or None for an empty element), in tag order."""
        elements = [(0x00080052, "CS", -1)]
        elements += [(a.tag, a.vr, i) for i, a in enumerate(self.attributes)]
        elements += [(tag, dictionary_VR(tag) if _known(tag) else "UN", None) for tag in self.query.unsupported]
        return tuple(sorted(elements))

    def encoded(self, row: tuple, *, implicit_vr: bool = True, little_endian: bool = True) -> bytes | None:
        """The response identifier of one row, encoded: what pydicom writes for :meth:`identifier`.

        None when a value is not ASCII text (the caller then encodes
        :meth:`identifier`, which handles the character set).  This is most of
        the work of a C-FIND with thousands of matches, so it is plain
        ``struct`` packing of the selected columns.
        """
        order = "<" if little_endian else ">"
        short, long = (_IMPLICIT_HEADERS[order] if implicit_vr else _EXPLICIT_HEADERS[order])
        parts = []
        level = self.query.level.value
        for tag, vr, index in self._layout:
            value = level if index == -1 else None if index is None else row[index]
            if value is None:
                raw = b""
            elif vr in _BINARY:
                raw = int(value).to_bytes(_BINARY[vr], "little" if little_endian else "big")
            else:
                text = str(value)
                if not text.isascii():
                    return None
                raw = text.encode("ascii")
                if len(raw) % 2:
                    raw += b"\0" if vr == "UI" else b" "
            group, element = tag >> 16, tag & 0xFFFF
            if implicit_vr:
                parts.append(short.pack(group, element, len(raw)))
            elif vr in _LONG_LENGTH_VRS:
                parts.append(long.pack(group, element, vr.encode(), len(raw)))
            else:
                parts.append(short.pack(group, element, vr.encode(), len(raw)))
            parts.append(raw)
        return b"".join(parts)


_BINARY = {"US": 2, "UL": 4}
# Explicit VR: these VRs have two reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_IMPLICIT_HEADERS = {o: (struct.Struct(o + "HHI"), None) for o in "<>"}
_EXPLICIT_HEADERS = {o: (struct.Struct(o + "HH2sH"), struct.Struct(o + "HH2s2xI")) for o in "<>"}


def _put(out: Dataset, tag: int, vr: str, value: object, byteorder: str) -> None:
    """Add one element, pre-encoded where that is exact (see ResponsePlan.identifier)."""
    if value is None:
        raw = b""
    elif vr in _BINARY:
        raw = int(value).to_bytes(_BINARY[vr], byteorder)
    else:
        text = str(value)
        if not text.isascii():
            out.add(DataElement(tag, vr, text.split("\\") if "\\" in text else text, validation_mode=config.IGNORE))
            return
        raw = text.encode("ascii")
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
    out[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, out.original_encoding[0], out.original_encoding[1], True)


def response_plan(query: Query) -> ResponsePlan:
    """The return keys of ``query``: what was asked, plus the unique keys at and above its level."""
    keywords = list(dict.fromkeys(query.requested))
    for level in (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)[: query.level.depth + 1]:
        unique = UNIQUE_KEYS[level]
        if unique not in keywords and (level is query.level or level is not Level.PATIENT):
            keywords.append(unique)
    return ResponsePlan(query, tuple(ATTRIBUTES[keyword] for keyword in keywords))


def _known(tag: int) -> bool:
    try:
        dictionary_VR(tag)
    except KeyError:
        return False
    return True
