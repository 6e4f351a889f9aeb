"""Read just enough of a DICOM Part 10 object to index it, without decoding pixels.

Two checks run before anything is written:

* :func:`check_structure` walks every element header of the file (skipping
  values, so pixel data is never copied or decoded) and fails when a declared
  length runs past the end of the bytes — a truncated transfer is caught here,
  which pydicom's reader alone would silently accept.
* :func:`parse_attributes` reads the header up to the pixel data and requires
  the UIDs the index is keyed on.

References: PS3.10 section 7 (file format), PS3.5 section 7 (data element
encoding) and A.4 (encapsulated pixel data).
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from pacs.errors import InvalidObject
from pacs.index.repository import InstanceAttributes

PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
# VRs whose explicit encoding has a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQ_END = (0xFFFE, 0xE0DD)
_MAX_DEPTH = 64


def check_structure(fp: BinaryIO, size: int, found: dict[tuple[int, int], tuple[bytes, bytes | None]] | None = None) -> str:
    """Validate the element structure of a Part 10 file; return its transfer syntax UID.

    ``fp`` must be seekable; ``size`` is the total byte count.  Raises
    :class:`InvalidObject` naming what is wrong and where.  When ``found`` is
    given, it receives ``tag -> (value bytes, VR)`` of the indexed top-level
    elements (not filled for deflated objects).
    """
    fp.seek(0)
    head = fp.read(PREAMBLE_LENGTH + 4)
    if len(head) < PREAMBLE_LENGTH + 4 or head[PREAMBLE_LENGTH:] != MAGIC:
        raise InvalidObject(
            "not a DICOM Part 10 file: expected 'DICM' at byte 128"
            + (f", got {head[PREAMBLE_LENGTH:]!r}" if len(head) >= PREAMBLE_LENGTH + 4 else f" (only {size} bytes)")
        )
    walker = _Walker(fp, size, implicit=False, little=True, found=found)
    # The file meta group (0002,xxxx) is always explicit VR little endian.
    meta_end, transfer_syntax = walker.walk_meta(PREAMBLE_LENGTH + 4)
    if not transfer_syntax:
        raise InvalidObject("file meta information lacks TransferSyntaxUID (0002,0010)")
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        fp.seek(meta_end)
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            body = inflater.decompress(fp.read()) + inflater.flush()
        except zlib.error as exc:
            raise InvalidObject(f"deflated dataset does not inflate: {exc}") from exc
        if not inflater.eof:
            raise InvalidObject("deflated dataset is truncated: the deflate stream does not end")
        inner = _Walker(io.BytesIO(body), len(body), implicit=False, little=True)
        inner.walk_dataset(0, len(body), depth=0)
        if found is not None:
            found.clear()
    else:
        walker.implicit = transfer_syntax == ImplicitVRLittleEndian
        walker.little = transfer_syntax != ExplicitVRBigEndian
        try:
            walker.walk_dataset(meta_end, size, depth=0)
        except _BadVR:
            # Some writers encode the dataset implicitly while the meta says
            # explicit; pydicom reads those, so a structure check in implicit
            # VR decides whether the bytes are whole.
            if walker.implicit:
                raise
            walker.implicit = True
            if found is not None:
                for tag in [t for t in found if t[0] != 0x0002]:
                    del found[tag]
            walker.walk_dataset(meta_end, size, depth=0)
    return transfer_syntax


class _BadVR(InvalidObject):
    pass


_READ_AHEAD = 16 << 10  # a typical header, all of it before the pixel data, in one read


class _Walker:
    def __init__(self, fp: BinaryIO, size: int, *, implicit: bool, little: bool, found: dict | None = None) -> None:
        self.fp = fp
        self.size = size
        self.implicit = implicit
        self.little = little
        self.found = found
        self._block = b""  # the bytes from _block_at on, read ahead: element headers come in order
        self._block_at = 0

    def _read(self, pos: int, n: int) -> bytes:
        if pos + n > self.size:
            raise InvalidObject(
                f"truncated: an element header at byte {pos} needs {n} bytes, the object has {self.size}"
            )
        offset = pos - self._block_at
        if offset < 0 or offset + n > len(self._block):
            self.fp.seek(pos)
            self._block = self.fp.read(min(max(n, _READ_AHEAD), self.size - pos))
            self._block_at, offset = pos, 0
        return self._block[offset:offset + n]

    def _header(self, pos: int) -> tuple[tuple[int, int], bytes | None, int, int]:
        """(tag, vr, value length, header length) of the element at ``pos``."""
        e = "<" if self.little else ">"
        group, element = struct.unpack(e + "HH", self._read(pos, 4))
        tag = (group, element)
        if group == 0xFFFE or self.implicit:
            (length,) = struct.unpack(e + "L", self._read(pos + 4, 4))
            return tag, None, length, 8
        vr = self._read(pos + 4, 2)
        if vr in _LONG_VRS:
            (length,) = struct.unpack(e + "L", self._read(pos + 8, 4))
            return tag, vr, length, 12
        if not vr.isalpha() or not vr.isupper():
            raise _BadVR(f"malformed element {group:04X},{element:04X} at byte {pos}: VR {vr!r}")
        (length,) = struct.unpack(e + "H", self._read(pos + 6, 2))
        return tag, vr, length, 8

    def walk_meta(self, pos: int) -> tuple[int, str]:
        transfer_syntax = ""
        while pos < self.size:
            (group,) = struct.unpack("<H", self._read(pos, 2))
            if group != 0x0002:
                break
            tag, _vr, length, hlen = self._header(pos)
            if length == _UNDEFINED:
                raise InvalidObject(f"file meta element {tag[0]:04X},{tag[1]:04X} has undefined length")
            value_at = pos + hlen
            self._skip_to(value_at, length, tag)
            if self.found is not None and tag == _MEDIA_SOP_INSTANCE:
                self.found[tag] = (self._read(value_at, length), _vr)
            if tag == (0x0002, 0x0010):
                transfer_syntax = self._read(value_at, length).rstrip(b"\x00 ").decode("ascii", "replace")
            pos = value_at + length
        return pos, transfer_syntax

    def _skip_to(self, value_at: int, length: int, tag: tuple[int, int]) -> None:
        if value_at + length > self.size:
            raise InvalidObject(
                f"truncated: element {tag[0]:04X},{tag[1]:04X} declares {length} bytes at byte "
                f"{value_at}, but the object ends at byte {self.size}"
            )

    def walk_dataset(self, pos: int, end: int, *, depth: int, in_item: bool = False) -> int:
        """Walk elements from ``pos`` to ``end`` (or to an item delimiter); return the end position."""
        if depth > _MAX_DEPTH:
            raise InvalidObject(f"sequences nested deeper than {_MAX_DEPTH} levels")
        while pos < end:
            tag, vr, length, hlen = self._header(pos)
            pos += hlen
            if tag == _ITEM_END:
                if not in_item:
                    raise InvalidObject(f"item delimiter outside an item at byte {pos - hlen}")
                return pos
            if length == _UNDEFINED:
                if vr not in (None, b"SQ", b"UN", b"OB", b"OW"):
                    raise InvalidObject(f"element {tag[0]:04X},{tag[1]:04X} of VR {vr!r} has undefined length")
                if vr == b"UN":
                    # Items of a UN sequence of undefined length are implicit VR (PS3.5 6.2.2).
                    implicit, self.implicit = self.implicit, True
                    try:
                        pos = self._walk_items(pos, depth + 1)
                    finally:
                        self.implicit = implicit
                else:
                    pos = self._walk_items(pos, depth + 1)
                continue
            self._skip_to(pos, length, tag)
            if depth == 0 and self.found is not None and tag in _FIELDS:
                self.found[tag] = (self._read(pos, length), vr)
            pos += length
        if in_item:
            raise InvalidObject("truncated: an item of undefined length has no item delimiter")
        if pos != end:
            raise InvalidObject(f"element lengths overrun the item ending at byte {end}")
        return pos

    def _walk_items(self, pos: int, depth: int) -> int:
        """Items of a sequence (or fragments of encapsulated pixel data) up to the sequence delimiter."""
        while True:
            tag, _vr, length, hlen = self._header(pos)
            if tag == _SEQ_END:
                return pos + hlen
            if tag != _ITEM:
                raise InvalidObject(
                    f"expected an item (FFFE,E000) or sequence delimiter at byte {pos}, got {tag[0]:04X},{tag[1]:04X}"
                )
            pos += hlen
            if length == _UNDEFINED:
                pos = self.walk_dataset(pos, self.size, depth=depth, in_item=True)
            else:
                self._skip_to(pos, length, tag)
                pos += length


def _text(ds: pydicom.Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip()[:limit]


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def normalize_time(value: str) -> str:
    """A DICOM TM as ``HHMMSS.ffffff`` (PS3.5 6.2), so strings sort as times do.

    Accepts the old ``HH:MM:SS`` form too; returns "" for an empty value.
    """
    value = value.strip().replace(":", "")
    if not value:
        return ""
    whole, _, fraction = value.partition(".")
    whole = whole.ljust(6, "0")[:6]
    return f"{whole}.{fraction.ljust(6, '0')[:6]}"


def read_attributes(fp: BinaryIO, size: int) -> InstanceAttributes:
    """Check the structure of a Part 10 object and return its indexed attributes.

    One walk over the element headers both validates the object and finds the
    indexed top-level elements, which are then decoded directly.  Objects
    whose text needs more than a single-byte or UTF-8 character set (ISO 2022
    code extensions), deflated ones and unusual encodings of the integer
    attributes go through pydicom instead (:func:`parse_attributes`).
    """
    found: dict[tuple[int, int], tuple[bytes, bytes | None]] = {}
    transfer_syntax = check_structure(fp, size, found)
    values = _decode_found(found, little=transfer_syntax != ExplicitVRBigEndian) if found else None
    if values is None:
        return parse_attributes(fp, transfer_syntax)
    return _attributes(values.get, transfer_syntax)


# (tag) -> (keyword, longest kept, kind): the top-level elements the index keeps.
_FIELDS: dict[tuple[int, int], tuple[str, int, str]] = {
    (0x0008, 0x0005): ("SpecificCharacterSet", 64, "text"),
    (0x0008, 0x0016): ("SOPClassUID", 64, "text"),
    (0x0008, 0x0018): ("SOPInstanceUID", 64, "text"),
    (0x0008, 0x0020): ("StudyDate", 8, "text"),
    (0x0008, 0x0021): ("SeriesDate", 8, "text"),
    (0x0008, 0x0030): ("StudyTime", 16, "text"),
    (0x0008, 0x0031): ("SeriesTime", 16, "text"),
    (0x0008, 0x0050): ("AccessionNumber", 16, "text"),
    (0x0008, 0x0060): ("Modality", 16, "text"),
    (0x0008, 0x0090): ("ReferringPhysicianName", 324, "text"),
    (0x0008, 0x1030): ("StudyDescription", 64, "text"),
    (0x0008, 0x103E): ("SeriesDescription", 64, "text"),
    (0x0010, 0x0010): ("PatientName", 324, "text"),
    (0x0010, 0x0020): ("PatientID", 64, "text"),
    (0x0010, 0x0021): ("IssuerOfPatientID", 64, "text"),
    (0x0010, 0x0030): ("PatientBirthDate", 8, "text"),
    (0x0010, 0x0040): ("PatientSex", 16, "text"),
    (0x0018, 0x0015): ("BodyPartExamined", 16, "text"),
    (0x0020, 0x000D): ("StudyInstanceUID", 64, "text"),
    (0x0020, 0x000E): ("SeriesInstanceUID", 64, "text"),
    (0x0020, 0x0010): ("StudyID", 16, "text"),
    (0x0020, 0x0011): ("SeriesNumber", 0, "int"),
    (0x0020, 0x0013): ("InstanceNumber", 0, "int"),
    (0x0020, 0x0052): ("FrameOfReferenceUID", 64, "text"),
    (0x0028, 0x0008): ("NumberOfFrames", 0, "int"),
    (0x0028, 0x0010): ("Rows", 0, "us"),
    (0x0028, 0x0011): ("Columns", 0, "us"),
}
_MEDIA_SOP_INSTANCE = (0x0002, 0x0003)
_TEXT_VRS = {None, b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"IS", b"LO", b"LT", b"PN", b"SH", b"ST", b"TM", b"UC", b"UI", b"UT"}
# Character sets whose bytes decode without code extensions (PS3.5 6.1.2.5).
_SIMPLE_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}


def _decode_found(
    raw: dict[tuple[int, int], tuple[bytes, bytes | None]], *, little: bool
) -> dict[str, str | int | None] | None:
    """Keyword -> value of the found elements, or None when pydicom must decode them."""
    charset = raw.get((0x0008, 0x0005), (b"", None))[0].decode("latin_1").strip(" \x00")
    encoding = _SIMPLE_CHARSETS.get(charset)
    if encoding is None:
        return None
    values: dict[str, str | int | None] = {}
    for tag, (value, vr) in raw.items():
        if tag == _MEDIA_SOP_INSTANCE:
            values["MediaStorageSOPInstanceUID"] = value.decode("latin_1").strip(" \x00")
            continue
        keyword, limit, kind = _FIELDS[tag]
        if kind == "us":
            if len(value) != 2 or vr not in (None, b"US"):
                return None
            values[keyword] = int.from_bytes(value, "little" if little else "big")
            continue
        if vr not in _TEXT_VRS:
            return None
        try:
            text = value.decode(encoding)
        except UnicodeDecodeError:
            return None
        text = "\\".join(part.strip(" \x00") for part in text.split("\\")).strip()
        if kind == "int":
            try:
                values[keyword] = int(text) if text and "\\" not in text else None
            except ValueError:
                values[keyword] = None
        else:
            values[keyword] = text[:limit]
    return values


def parse_attributes(fp: BinaryIO, transfer_syntax_uid: str) -> InstanceAttributes:
    """The indexed attributes of a Part 10 object (pixel data is not read)."""
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error) as exc:
        raise InvalidObject(f"cannot parse the DICOM header: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    media_sop = str(meta.get("MediaStorageSOPInstanceUID", "")).strip() if meta else ""

    def get(keyword: str) -> str | int | None:
        if keyword == "MediaStorageSOPInstanceUID":
            return media_sop
        if _KINDS[keyword] == "text":
            return _text(ds, keyword, _LIMITS[keyword])
        return _int(ds, keyword)

    return _attributes(get, transfer_syntax_uid)


_KINDS = {keyword: kind for keyword, _limit, kind in _FIELDS.values()}
_LIMITS = {keyword: limit for keyword, limit, _kind in _FIELDS.values()}


def _attributes(get, transfer_syntax_uid: str) -> InstanceAttributes:  # noqa: ANN001 - keyword -> value
    """Check the required UIDs and build the index record from ``get(keyword)``."""

    def text(keyword: str) -> str:
        return str(get(keyword) or "")

    missing = [
        keyword
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not text(keyword)
    ]
    sop_uid = text("SOPInstanceUID")
    if missing:
        raise InvalidObject(
            f"missing required {', '.join(missing)}" + (f" in SOP instance {sop_uid}" if sop_uid else "")
        )
    media_sop = text("MediaStorageSOPInstanceUID")
    if media_sop and media_sop != sop_uid:
        raise InvalidObject(f"MediaStorageSOPInstanceUID {media_sop} differs from SOPInstanceUID {sop_uid}")
    return InstanceAttributes(
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate"),
        patient_sex=text("PatientSex"),
        study_instance_uid=text("StudyInstanceUID"),
        study_date=text("StudyDate"),
        study_time=normalize_time(text("StudyTime")),
        accession_number=text("AccessionNumber"),
        study_id=text("StudyID"),
        study_description=text("StudyDescription"),
        referring_physician_name=text("ReferringPhysicianName"),
        series_instance_uid=text("SeriesInstanceUID"),
        modality=text("Modality"),
        series_number=get("SeriesNumber"),
        series_description=text("SeriesDescription"),
        body_part_examined=text("BodyPartExamined"),
        series_date=text("SeriesDate"),
        series_time=normalize_time(text("SeriesTime")),
        frame_of_reference_uid=text("FrameOfReferenceUID"),
        sop_instance_uid=sop_uid,
        sop_class_uid=text("SOPClassUID"),
        instance_number=get("InstanceNumber"),
        rows=get("Rows"),
        columns=get("Columns"),
        number_of_frames=get("NumberOfFrames"),
        transfer_syntax_uid=transfer_syntax_uid,
    )
