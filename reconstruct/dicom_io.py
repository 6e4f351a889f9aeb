"""DICOM in and out of the reconstruction: projection series -> geometry, volume -> CT series.

Pure pydicom + numpy; no networking, nothing from ``pacs``.  The tags read and
written are listed in ``docs/conformance.md`` section 8 and in the docstrings
of :func:`geometry_from_projection_datasets` and :func:`volume_to_ct_datasets`.

Conventions (``reconstruct.geometry`` / ``docs/reconstruction.md`` for RTK's):

* **Angles.**  Positioner Primary Angle (0018,1510) and its increments are in
  degrees; RTK's ``GantryAngle`` is ``theta = radians(angle)``: same value,
  same sign, no offset.  DICOM's primary angle turns about the patient's
  cranio-caudal axis, 0 = AP view (source posterior, detector anterior),
  positive towards LAO (detector to the patient's left).  RTK's gantry angle
  turns about y, 0 = source on +z, 90 deg = source on +x.  Identifying the two
  gives the fixed rigid mapping below.
* **Patient frame.**  RTK fixed frame ``(x, y, z)`` -> DICOM patient (LPS)
  ``(X, Y, Z) = (-x, z, y)``: RTK +z (source at angle 0) is posterior, RTK +x
  (source at +90 deg) is the patient's right, the rotation axis +y is
  superior.  The isocentre is the patient-frame origin (table positions are
  not used).  This assumes a supine, head-first patient on a C-arm whose
  primary axis is the patient's long axis, and projections stored with
  columns along RTK's u and rows along RTK's v (row index growing towards
  +y); Patient Orientation (0020,0020) is not used to flip images.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from .geometry import ConeBeamGeometry, VolumeGrid

__all__ = [
    "geometry_from_projection_datasets",
    "volume_to_ct_datasets",
    "ct_slice_geometry",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "PRIVATE_ELEMENTS",
    "MU_WATER_PER_MM",
    "RTK_TO_PATIENT",
]

#: Private creator reserving the block of the optional RTK offsets.
PRIVATE_CREATOR = "PACS RECON 1"
#: Odd group holding the private block (the element block is whatever the creator reserves).
PRIVATE_GROUP = 0x0071
#: Element offsets (low byte) inside the block, VR FD, mm, VM 1 or one per frame.
PRIVATE_ELEMENTS = {
    0x01: "projection_offset_x_mm",  # RTK ProjectionOffsetX
    0x02: "projection_offset_y_mm",  # RTK ProjectionOffsetY
    0x03: "source_offset_x_mm",  # RTK SourceOffsetX
    0x04: "source_offset_y_mm",  # RTK SourceOffsetY
}

#: Linear attenuation of water (1/mm) used for HU by default (about 70 keV).
MU_WATER_PER_MM = 0.0195

#: RTK fixed frame (x, y, z) -> DICOM patient LPS (X, Y, Z) = (-x, z, y); columns are x, y, z.
RTK_TO_PATIENT = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])

_INCREMENT_MODES = ("offsets", "cumulative")

# (keyword, tag text) of the attributes read from a projection.
_SDD = ("DistanceSourceToDetector", "(0018,1110)")
_SID = ("DistanceSourceToPatient", "(0018,1111)")
_SPACING = ("ImagerPixelSpacing", "(0018,1164)")
_ANGLE = ("PositionerPrimaryAngle", "(0018,1510)")
_INCREMENT = ("PositionerPrimaryAngleIncrement", "(0018,1520)")
_ROWS = ("Rows", "(0028,0010)")
_COLUMNS = ("Columns", "(0028,0011)")


# ---------------------------------------------------------------------------
# Reading projections
# ---------------------------------------------------------------------------


def _label(ds: Dataset, index: int | None) -> str:
    uid = ds.get("SOPInstanceUID", None)
    where = f"projection instance {index}" if index is not None else "projection instance"
    return f"{where} ({uid})" if uid else where


def _lookup(ds: Dataset, keyword: str) -> Any:
    """``keyword`` at the top level, else in the first item of a Shared Functional Groups macro."""
    value = ds.get(keyword, None)
    if value is not None and value != "":
        return value
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    if shared:
        for elem in shared[0]:
            if elem.VR == "SQ" and elem.value:
                inner = elem.value[0].get(keyword, None)
                if inner is not None and inner != "":
                    return inner
    return None


def _numbers(ds: Dataset, attr: tuple[str, str], where: str, *, count: int | Sequence[int] | None = 1) -> np.ndarray:
    keyword, tag = attr
    value = _lookup(ds, keyword)
    if value is None:
        raise ValueError(f"{where}: expected {keyword} {tag}, got none (missing or empty)")
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        arr = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected numbers in {keyword} {tag}, got {value!r}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: expected finite numbers in {keyword} {tag}, got {value!r}")
    allowed = (count,) if isinstance(count, int) else count
    if allowed is not None and arr.size not in allowed:
        expected = " or ".join(str(c) for c in allowed)
        raise ValueError(f"{where}: expected {expected} value(s) in {keyword} {tag}, got {arr.size}")
    return arr


def _private_offsets(ds: Dataset, n: int, where: str) -> dict[str, np.ndarray]:
    """The optional RTK offsets of the ``PACS RECON 1`` private block (VM 1 or ``n``)."""
    out: dict[str, np.ndarray] = {}
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return out
    for offset, name in PRIVATE_ELEMENTS.items():
        if offset not in block:
            continue
        raw = block[offset].value
        if isinstance(raw, bytes):  # read without a dictionary as UN / OB: decode as FD little endian
            if len(raw) % 8:
                raise ValueError(f"{where}: expected FD values in private {PRIVATE_CREATOR!r} element "
                                 f"{offset:#04x}, got {len(raw)} bytes")
            arr = np.frombuffer(raw, dtype="<f8").astype(np.float64)
        else:
            values = list(raw) if isinstance(raw, (list, tuple, pydicom.multival.MultiValue)) else [raw]
            arr = np.array([float(v) for v in values], dtype=np.float64)
        if arr.size not in (1, n):
            raise ValueError(f"{where}: expected 1 or {n} values in private {PRIVATE_CREATOR!r} element "
                             f"({PRIVATE_GROUP:04X},xx{offset:02X}) {name}, got {arr.size}")
        out[name] = np.broadcast_to(arr, (n,)).copy()
    return out


def _frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", None)
    if value is None or value == "":
        return 1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_label(ds, None)}: expected an integer NumberOfFrames (0028,0008), got {value!r}") from None


def _line_integrals(ds: Dataset, where: str, frames: int, rows: int, columns: int) -> np.ndarray:
    """Pixel data after Modality rescale, shape ``(frames, rows, columns)`` float32."""
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise ValueError(f"{where}: expected SamplesPerPixel (0028,0002) 1, got {samples}")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ValueError(f"{where}: expected PixelData (7FE0,0010), got none")
    try:
        pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for undecodable data
        raise ValueError(f"{where}: expected decodable pixel data of {frames} frame(s) of {rows} x {columns} "
                         f"(Rows x Columns), got {type(exc).__name__}: {exc}") from None
    pixels = pixels.reshape((-1,) + pixels.shape[-2:]) if pixels.ndim >= 2 else pixels
    if pixels.shape != (frames, rows, columns):
        raise ValueError(f"{where}: expected pixel data of {frames} frame(s) of {rows} x {columns}, "
                         f"got shape {pixels.shape}")
    slope = _lookup(ds, "RescaleSlope")
    intercept = _lookup(ds, "RescaleIntercept")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    return (pixels * slope + intercept).astype(np.float32)


def _check_same_series(datasets: Sequence[Dataset]) -> None:
    for keyword, tag in (("SeriesInstanceUID", "(0020,000E)"), ("StudyInstanceUID", "(0020,000D)"),
                         ("FrameOfReferenceUID", "(0020,0052)")):
        values = {str(ds.get(keyword, "") or "") for ds in datasets}
        if len(values) > 1:
            raise ValueError(f"projection series: expected a single {keyword} {tag}, "
                             f"got {len(values)} different values ({sorted(values)[:3]}...): mixed series")
    uids = [str(ds.get("SOPInstanceUID", "") or "") for ds in datasets]
    named = [u for u in uids if u]
    if len(set(named)) != len(named):
        raise ValueError("projection series: expected distinct SOPInstanceUID (0008,0018), got duplicates")


def _single_frame_order(datasets: Sequence[Dataset]) -> list[int]:
    numbers = [ds.get("InstanceNumber", None) for ds in datasets]
    present = [n is not None and n != "" for n in numbers]
    if not any(present):
        return list(range(len(datasets)))
    if not all(present):
        raise ValueError(f"projection series: expected InstanceNumber (0020,0013) in every instance or in none, "
                         f"got it in {sum(present)} of {len(datasets)}")
    values = [int(n) for n in numbers]  # type: ignore[arg-type]
    if len(set(values)) != len(values):
        raise ValueError("projection series: expected distinct InstanceNumber (0020,0013) values, got duplicates")
    return sorted(range(len(datasets)), key=lambda i: values[i])


def geometry_from_projection_datasets(
    datasets: Dataset | Iterable[Dataset],
    *,
    increment_mode: str = "offsets",
) -> tuple[ConeBeamGeometry, np.ndarray]:
    """A projection series -> ``(ConeBeamGeometry, projections [angle, v, u] float32)``.

    Two encodings are accepted (never mixed):

    **A. One multi-frame instance** (any SOP class: XA, Enhanced XA, X-Ray 3D
    Angiographic, multi-frame Secondary Capture, ...) with Number of Frames
    (0028,0008) > 1; frame ``k`` is projection ``k``.

    **B. One single-frame instance per projection** (at least 2), ordered by
    Instance Number (0020,0013) when every instance has one (all distinct),
    in the given order when none has; each instance carries its own angle and
    distances.  All must share Series/Study Instance UID, Frame of Reference
    UID, Rows, Columns and Imager Pixel Spacing (else "mixed series").

    Tags read (top level; when absent there, the first item of each sequence
    in the first item of Shared Functional Groups Sequence (5200,9229) is
    looked at, as Enhanced XA keeps them):

    * Distance Source to Detector (0018,1110) -> ``source_to_detector_mm`` (SDD).
    * Distance Source to Patient (0018,1111) -> ``source_to_isocenter_mm``
      (SID; the standard's "source to center of field of view", i.e. isocentre).
    * Imager Pixel Spacing (0018,1164) = (row spacing, column spacing) in mm at
      the detector -> ``detector_spacing_uv_mm = (column spacing, row spacing)``.
    * Rows (0028,0010) -> ``nv``, Columns (0028,0011) -> ``nu``; the detector
      is centred on the central ray (RTK's default origin).
    * Positioner Primary Angle (0018,1510), degrees.
    * A only: Positioner Primary Angle Increment (0018,1520), degrees, VM 1 or
      Number of Frames.  PS3.3 C.8.7.5.1.3 defines it as either one value, the
      average change per frame (frame ``k`` at ``angle + k * inc``), or one
      value per frame, *offsets from the initial Positioner Primary Angle*
      (frame ``k`` at ``angle + inc[k]``; the standard allows absolute angles
      here with the primary angle 0).  That is ``increment_mode="offsets"``,
      the default.  ``increment_mode="cumulative"`` reads a per-frame vector
      as changes from the previous frame instead (frame ``k`` at
      ``angle + inc[0] + ... + inc[k]``), which some producers write.
    * Pixel Data, Samples per Pixel (0028,0002) = 1, Rescale Slope (0028,1053)
      and Rescale Intercept (0028,1052) (absent: 1 and 0): **the rescaled
      pixel values are the line integrals** (dimensionless, attenuation in
      1/mm times mm); no log conversion or flat-field is applied.
    * Optional private block, creator ``"PACS RECON 1"`` in group 0071
      (``(0071,00xx) LO = PACS RECON 1``, elements ``(0071,xx01..xx04)``, FD,
      mm, VM 1 or one per frame): RTK ProjectionOffsetX, ProjectionOffsetY,
      SourceOffsetX, SourceOffsetY.  Absent: 0.  No standard attribute holds
      RTK's detector offsets.

    Angle mapping: RTK ``GantryAngle = radians(PositionerPrimaryAngle + increment)``,
    same sign (see the module docstring for the patient-frame meaning).

    Raises ``ValueError`` ("expected ..., got ...") for a missing or malformed
    tag, sizes that disagree, fewer than 2 projections, or a mixed series.
    """
    if increment_mode not in _INCREMENT_MODES:
        raise ValueError(f"increment_mode: expected one of {_INCREMENT_MODES}, got {increment_mode!r}")
    items = [datasets] if isinstance(datasets, Dataset) else list(datasets)
    if not items:
        raise ValueError("projection series: expected at least 2 projections, got no dataset")
    for i, ds in enumerate(items):
        if not isinstance(ds, Dataset):
            raise ValueError(f"projection series: expected pydicom Datasets, got {type(ds).__name__} at {i}")
    frames = [_frames(ds) for ds in items]
    if len(items) == 1 and frames[0] > 1:
        return _from_multi_frame(items[0], frames[0], increment_mode)
    if any(f > 1 for f in frames):
        raise ValueError(f"projection series: expected one multi-frame instance or single-frame instances only, "
                         f"got {len(items)} instances with NumberOfFrames {frames}")
    if len(items) < 2:
        raise ValueError("projection series: expected at least 2 projections, got 1 single-frame instance")
    return _from_single_frames(items)


def _detector(ds: Dataset, where: str) -> tuple[int, int, tuple[float, float]]:
    rows = int(_numbers(ds, _ROWS, where)[0])
    columns = int(_numbers(ds, _COLUMNS, where)[0])
    spacing = _numbers(ds, _SPACING, where, count=2)
    if np.any(spacing <= 0):
        raise ValueError(f"{where}: expected positive ImagerPixelSpacing (0018,1164), got {spacing.tolist()}")
    return rows, columns, (float(spacing[1]), float(spacing[0]))


def _from_multi_frame(ds: Dataset, n: int, increment_mode: str) -> tuple[ConeBeamGeometry, np.ndarray]:
    where = _label(ds, None)
    rows, columns, spacing_uv = _detector(ds, where)
    sdd = _numbers(ds, _SDD, where)[0]
    sid = _numbers(ds, _SID, where)[0]
    start = _numbers(ds, _ANGLE, where)[0]
    inc = _numbers(ds, _INCREMENT, where, count=(1, n))
    if inc.size == 1:
        angles_deg = start + inc[0] * np.arange(n)
    elif increment_mode == "offsets":
        angles_deg = start + inc
    else:
        angles_deg = start + np.cumsum(inc)
    projections = _line_integrals(ds, where, n, rows, columns)
    geometry = _geometry(angles_deg, sid, sdd, columns, rows, spacing_uv, _private_offsets(ds, n, where), where)
    return geometry, projections


def _from_single_frames(items: list[Dataset]) -> tuple[ConeBeamGeometry, np.ndarray]:
    _check_same_series(items)
    order = _single_frame_order(items)
    items = [items[i] for i in order]
    n = len(items)
    first = _label(items[0], 0)
    rows, columns, spacing_uv = _detector(items[0], first)
    angles, sids, sdds = np.empty(n), np.empty(n), np.empty(n)
    offsets: dict[str, np.ndarray] = {}
    projections = np.empty((n, rows, columns), dtype=np.float32)
    for k, ds in enumerate(items):
        where = _label(ds, k)
        r, c, s = _detector(ds, where)
        if (r, c) != (rows, columns):
            raise ValueError(f"{where}: expected Rows x Columns {rows} x {columns} as the first projection, "
                             f"got {r} x {c}")
        if not np.allclose(s, spacing_uv, rtol=1e-9, atol=0.0):
            raise ValueError(f"{where}: expected ImagerPixelSpacing {[spacing_uv[1], spacing_uv[0]]} as the first "
                             f"projection, got {[s[1], s[0]]}")
        sdds[k] = _numbers(ds, _SDD, where)[0]
        sids[k] = _numbers(ds, _SID, where)[0]
        angles[k] = _numbers(ds, _ANGLE, where)[0]
        for name, value in _private_offsets(ds, 1, where).items():
            offsets.setdefault(name, np.zeros(n))[k] = value[0]
        projections[k] = _line_integrals(ds, where, 1, rows, columns)[0]
    geometry = _geometry(angles, sids, sdds, columns, rows, spacing_uv, offsets, "projection series")
    return geometry, projections


def _geometry(angles_deg, sid, sdd, nu, nv, spacing_uv, offsets, where) -> ConeBeamGeometry:
    try:
        return ConeBeamGeometry(
            angles_rad=np.radians(np.asarray(angles_deg, dtype=np.float64)),
            source_to_isocenter_mm=sid,
            source_to_detector_mm=sdd,
            detector_size_uv=(nu, nv),
            detector_spacing_uv_mm=spacing_uv,
            **offsets,
        )
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------
# Writing the CT series
# ---------------------------------------------------------------------------


def ct_slice_geometry(grid: VolumeGrid, j: int) -> dict[str, list[float]]:
    """Image Plane values of slice ``j`` (``volume[:, j, ::-1]``) in patient LPS.

    The written pixel ``[r, c]`` of slice ``j`` is voxel ``[r, j, nx - 1 - c]``
    (columns reversed so that they run towards patient left, +X).  Hence
    ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]`` (rows towards +X = -x,
    columns of pixels down towards +Y = +z), PixelSpacing ``[dz, dx]``, and
    ImagePositionPatient ``(-(ox + (nx - 1) dx), oz, oy + j dy)``.
    """
    nx = grid.dimension_xyz[0]
    ox, oy, oz = grid.origin_xyz_mm  # type: ignore[misc]
    dx, dy, dz = grid.spacing_xyz_mm
    first_voxel_rtk = np.array([ox + (nx - 1) * dx, oy + j * dy, oz])
    position = RTK_TO_PATIENT @ first_voxel_rtk
    row_dir = RTK_TO_PATIENT @ np.array([-1.0, 0.0, 0.0])  # along c: x decreases
    col_dir = RTK_TO_PATIENT @ np.array([0.0, 0.0, 1.0])  # along r: z increases
    return {
        "ImagePositionPatient": [float(v) + 0.0 for v in position],
        "ImageOrientationPatient": [float(v) + 0.0 for v in np.concatenate([row_dir, col_dir])],
        "PixelSpacing": [float(dz), float(dx)],
    }


def _ds(value: float) -> str:
    return format_number_as_ds(float(value) + 0.0)


_PATIENT_STUDY = (
    # keyword, type 2 (always written, empty when unknown)?
    ("PatientName", True), ("PatientID", True), ("IssuerOfPatientID", False), ("PatientBirthDate", True),
    ("PatientSex", True), ("PatientAge", False), ("PatientSize", False), ("PatientWeight", False),
    ("StudyInstanceUID", True), ("StudyDate", True), ("StudyTime", True), ("StudyID", True),
    ("AccessionNumber", True), ("ReferringPhysicianName", True), ("StudyDescription", False),
    ("PatientPosition", True), ("BodyPartExamined", False), ("SpecificCharacterSet", False),
)


def _hu_rescale(hu: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) storing ``hu`` in int16; intercept -1024, slope 1 unless the range needs more."""
    intercept = -1024.0
    lo, hi = (float(hu.min()), float(hu.max())) if hu.size else (0.0, 0.0)
    needed = max((hi - intercept) / 32767.0, (intercept - lo) / 32768.0, 1.0)
    slope = 1.0 if needed <= 1.0 else float(math.ceil(needed * 1000.0) / 1000.0)
    return slope, intercept


def volume_to_ct_datasets(
    volume: np.ndarray,
    grid: VolumeGrid,
    *,
    source: Dataset | Sequence[Dataset],
    series_description: str,
    mu_water_per_mm: float = MU_WATER_PER_MM,
    series_number: int | None = None,
    derivation_description: str = "FDK cone-beam reconstruction (reconstruct.fdk)",
    content_datetime: _dt.datetime | None = None,
) -> list[FileDataset]:
    """One CT Image Storage instance per slice across the rotation axis.

    Args:
        volume: attenuation ``[z, y, x]`` in 1/mm, shape ``grid.shape``.
        grid: its grid; slice ``j`` is ``volume[:, j, :]`` (y = rotation axis).
        source: one instance of the projection series (patient, study, frame
            of reference), or all of them (every one is referenced).
        series_description: Series Description (0008,103E).
        mu_water_per_mm: attenuation of water, 1/mm (default 0.0195, ~70 keV);
            ``HU = 1000 (mu - mu_water) / mu_water``.
        series_number: Series Number (0020,0011); ``None`` writes it empty (type 2).
        derivation_description: Derivation Description (0008,2111).
        content_datetime: Content Date/Time (default: now, local).

    Written per instance (file meta: Explicit VR Little Endian, Media Storage
    SOP Class/Instance UID, pydicom's Implementation Class UID):

    * SOP Class UID CT Image Storage, new SOP Instance UID; Modality CT;
      ImageType ``DERIVED\\SECONDARY\\AXIAL``; InstanceNumber 1..ny (slice j+1).
    * Copied from ``source`` (type 2 written empty when absent): Patient
      Name/ID/Birth Date/Sex (+ Issuer, Age, Size, Weight when present), Study
      Instance UID/Date/Time/ID, Accession Number, Referring Physician, Study
      Description, Patient Position, Body Part Examined, Specific Character Set;
      Frame of Reference UID (a new one when the source has none, shared by
      all slices), Position Reference Indicator written empty.
    * New Series Instance UID shared by the slices; Series Number/Description;
      Content, Instance Creation Date/Time.
    * Image Plane: see :func:`ct_slice_geometry`; SliceThickness and
      SpacingBetweenSlices = dy; SliceLocation = Z.
    * Pixels: int16 (BitsAllocated/Stored 16, HighBit 15, PixelRepresentation 1,
      MONOCHROME2), RescaleIntercept -1024, RescaleSlope 1 (larger only if
      the HU range does not fit int16), RescaleType HU; WindowCenter 40 /
      WindowWidth 400; KVP and AcquisitionNumber empty.
    * Derivation: DerivationDescription; SourceImageSequence (0008,2112) and
      ReferencedSeriesSequence (0008,1115) > ReferencedInstanceSequence with the
      source instances' SOP Class/Instance UIDs and Series Instance UID.
    """
    vol = np.asarray(volume)
    if vol.shape != grid.shape:
        raise ValueError(f"volume: expected shape {grid.shape} (grid [z, y, x]), got {vol.shape}")
    if not (math.isfinite(mu_water_per_mm) and mu_water_per_mm > 0):
        raise ValueError(f"mu_water_per_mm: expected a positive number, got {mu_water_per_mm!r}")
    sources = [source] if isinstance(source, Dataset) else list(source)
    if not sources or not all(isinstance(s, Dataset) for s in sources):
        raise ValueError("source: expected a pydicom Dataset or a non-empty sequence of them, got "
                         f"{type(source).__name__}")
    first = sources[0]
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID"):
        if not first.get(keyword, None):
            raise ValueError(f"source: expected {keyword} in the projection instance, got none")

    hu = 1000.0 * (vol.astype(np.float64) - mu_water_per_mm) / mu_water_per_mm
    if not np.all(np.isfinite(hu)):
        raise ValueError("volume: expected finite values, got NaN or infinity")
    slope, intercept = _hu_rescale(hu)
    stored = np.clip(np.rint((hu - intercept) / slope), -32768, 32767).astype(np.int16)

    when = content_datetime or _dt.datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    series_uid = generate_uid()
    frame_uid = str(first.get("FrameOfReferenceUID", "") or "") or generate_uid()
    nx, ny, nz = grid.dimension_xyz
    dy = grid.spacing_xyz_mm[1]

    def references() -> tuple[DicomSequence, DicomSequence]:
        images = DicomSequence()
        by_series: dict[str, DicomSequence] = {}
        for s in sources:
            item = Dataset()
            item.ReferencedSOPClassUID = s.SOPClassUID
            item.ReferencedSOPInstanceUID = s.SOPInstanceUID
            images.append(item)
            ref = Dataset()
            ref.ReferencedSOPClassUID = s.SOPClassUID
            ref.ReferencedSOPInstanceUID = s.SOPInstanceUID
            by_series.setdefault(str(s.SeriesInstanceUID), DicomSequence()).append(ref)
        series = DicomSequence()
        for uid, instances in by_series.items():
            item = Dataset()
            item.SeriesInstanceUID = uid
            item.ReferencedInstanceSequence = instances
            series.append(item)
        return images, series

    out: list[FileDataset] = []
    for j in range(ny):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "RECON_DICOM_IO"
        ds = FileDataset(f"ct_{j + 1:04d}.dcm", Dataset(), file_meta=meta, preamble=b"\0" * 128)

        for keyword, type2 in _PATIENT_STUDY:
            value = first.get(keyword, None)
            if value is not None and value != "":
                setattr(ds, keyword, value)
            elif type2:
                setattr(ds, keyword, "")
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = "" if series_number is None else int(series_number)
        ds.SeriesDescription = series_description
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.Manufacturer = ""
        ds.SoftwareVersions = "reconstruct"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = j + 1
        ds.ContentDate, ds.ContentTime = date, time
        ds.AcquisitionNumber = ""
        ds.KVP = ""
        ds.DerivationDescription = derivation_description
        ds.SourceImageSequence, ds.ReferencedSeriesSequence = references()

        plane = ct_slice_geometry(grid, j)
        ds.ImagePositionPatient = [_ds(v) for v in plane["ImagePositionPatient"]]
        ds.ImageOrientationPatient = [_ds(v) for v in plane["ImageOrientationPatient"]]
        ds.PixelSpacing = [_ds(v) for v in plane["PixelSpacing"]]
        ds.SliceThickness = _ds(dy)
        ds.SpacingBetweenSlices = _ds(dy)
        ds.SliceLocation = _ds(plane["ImagePositionPatient"][2])

        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nz, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        pixels = np.ascontiguousarray(stored[:, j, ::-1]).astype("<i2")
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def projections_to_multiframe(
    projections: np.ndarray,
    geometry: ConeBeamGeometry,
    *,
    patient_id: str = "PHANTOM",
    patient_name: str = "PHANTOM^SHEPP LOGAN",
    study_instance_uid: str | None = None,
    series_description: str = "cone-beam projections",
) -> FileDataset:
    """A projection stack as ONE multi-frame X-Ray Angiographic instance (encoding a).

    The inverse of :func:`geometry_from_projection_datasets` for a centred
    detector without offsets: line integrals are stored as 16-bit unsigned
    values with a RescaleSlope chosen to cover their range, angles as
    PositionerPrimaryAngle plus per-frame offsets in
    PositionerPrimaryAngleIncrement.  Used by the demo scanner and tests.
    """
    if projections.ndim != 3 or projections.shape[0] != geometry.n_projections:
        raise ValueError(
            f"projections: expected [angle, v, u] with {geometry.n_projections} angles, got shape {projections.shape}"
        )
    if np.any(geometry.projection_offset_x_mm) or np.any(geometry.projection_offset_y_mm):
        raise ValueError("geometry: expected a centred detector without offsets, got projection offsets")
    n, nv, nu = projections.shape
    peak = float(max(np.max(projections), 1e-6))
    slope = peak / 65000.0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, patient_name, "", "O"
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    now = _dt.datetime.now()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "XA", 1, 1
    ds.SeriesDescription = series_description
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = nv, nu
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = format_number_as_ds(slope), "0"
    ds.DistanceSourceToDetector = format_number_as_ds(float(geometry.source_to_detector_mm[0]))
    ds.DistanceSourceToPatient = format_number_as_ds(float(geometry.source_to_isocenter_mm[0]))
    du, dv = geometry.detector_spacing_uv_mm
    ds.ImagerPixelSpacing = [format_number_as_ds(float(dv)), format_number_as_ds(float(du))]
    degrees = np.degrees(geometry.angles_rad)
    ds.NumberOfFrames = n
    ds.FrameIncrementPointer = 0x00181520
    ds.PositionerMotion = "DYNAMIC"
    ds.PositionerPrimaryAngle = format_number_as_ds(float(degrees[0]))
    ds.PositionerPrimaryAngleIncrement = [format_number_as_ds(float(v)) for v in degrees - degrees[0]]
    ds.PixelData = np.rint(np.clip(projections, 0, None) / slope).astype("<u2").tobytes()
    return ds
