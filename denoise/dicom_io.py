"""CT slices in and denoised derived series out, as DICOM files (pydicom; no networking).

Reading (``read_ct_series`` for files, ``ct_series_from_datasets`` for
datasets already parsed, e.g. from the archive): every slice must be a CT
Image (Modality ``CT``) with Pixel Data, from one series; slices are ordered
by Image Position (Patient) along the slice normal (else by Instance Number)
and converted to HU with Rescale Slope/Intercept (0028,1053/1052).

Writing (``derived_ct_datasets``): one new instance per source slice, a copy
of the source's patient, study, frame-of-reference and geometry attributes
(Image Position/Orientation, Pixel Spacing, Slice Thickness/Location), with

* new Series Instance UID (one for the series) and SOP Instance UIDs;
* Image Type ``DERIVED\\SECONDARY`` (+ the source's third value, e.g. AXIAL);
* Series Description ``"<source description> [denoised unet-<version>]"``
  (at most 64 characters), Series Number source + 1000;
* Derivation Description naming the model version and inference settings;
* Source Image Sequence (each slice's source SOP) and Referenced Series
  Sequence (the source series with its instances);
* pixels: signed 16-bit, Rescale Slope 1, Intercept 0 (stored value = HU,
  rounded), Explicit VR Little Endian, window from the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["DicomInputError", "CtSeries", "read_ct_series", "ct_series_from_datasets", "derived_ct_datasets"]

#: Attributes copied from each source slice to its derived slice.
COPIED = (
    # patient and study
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription",
    # equipment, frame of reference, geometry
    "Manufacturer", "InstitutionName", "FrameOfReferenceUID", "PositionReferenceIndicator",
    "Modality", "BodyPartExamined", "PatientPosition", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SliceThickness", "SliceLocation", "SpacingBetweenSlices", "InstanceNumber",
    "AcquisitionNumber", "KVP", "ConvolutionKernel", "ReconstructionDiameter",
    "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime",
    "WindowCenter", "WindowWidth",
)


class DicomInputError(ValueError):
    """An input file that is not a usable CT slice."""


@dataclass
class CtSeries:
    """Slices of one CT series: HU ``[N, H, W]`` float32 and their datasets (same order).

    ``paths`` are the files they were read from (empty for datasets read elsewhere).
    """

    hu: np.ndarray
    datasets: list[Dataset]
    paths: list[Path]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DicomInputError(f"input: expected DICOM files in the folder {path}, got none")
        return files
    if path.is_file():
        return [path]
    raise DicomInputError(f"input: expected a DICOM file or folder, got {str(path)!r} (no such file or folder)")


def _order(datasets: Sequence[Dataset]) -> list[int]:
    try:
        orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        keys = [float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in datasets]
    except (AttributeError, TypeError, ValueError, IndexError):
        keys = [float(getattr(ds, "InstanceNumber", i) or i) for i, ds in enumerate(datasets)]
    return sorted(range(len(datasets)), key=lambda i: keys[i])


def read_ct_series(path: Path | str) -> CtSeries:
    """All CT slices of ``path`` (a file or a folder searched recursively), as HU.

    Raises ``DicomInputError`` naming the file and the offending value for a
    non-DICOM file, another modality, missing pixel data, several series or
    slices of different sizes.
    """
    datasets, paths = [], []
    for file in _files(Path(path)):
        try:
            ds = pydicom.dcmread(file)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise DicomInputError(f"{file.name}: expected a DICOM file, got unreadable data ({exc})") from None
        _check_slice(ds, file.name)
        datasets.append(ds)
        paths.append(file)
    return ct_series_from_datasets(datasets, paths=paths)


def ct_series_from_datasets(datasets: Sequence[Dataset], *, paths: Sequence[Path] | None = None) -> CtSeries:
    """CT slices already parsed (e.g. read from the archive) as a ``CtSeries``, checked and ordered.

    The same checks and order as ``read_ct_series``; errors name the file of
    ``paths`` (same order as ``datasets``), else the slice's SOP Instance UID.
    ``paths`` of the result is empty without ``paths``.
    """
    datasets = list(datasets)
    if paths is not None and len(paths) != len(datasets):
        raise ValueError(f"paths: expected one per dataset ({len(datasets)}), got {len(paths)}")
    names = [p.name for p in paths] if paths is not None else [_instance_name(ds, i) for i, ds in enumerate(datasets)]
    if not datasets:
        raise DicomInputError("input: expected CT slices, got none")
    for ds, name in zip(datasets, names):
        _check_slice(ds, name)
    series = {ds.get("SeriesInstanceUID") for ds in datasets}
    if len(series) != 1:
        raise DicomInputError(f"input: expected slices of one series, got {len(series)} Series Instance UIDs")
    order = _order(datasets)
    datasets, names = [datasets[i] for i in order], [names[i] for i in order]
    ordered_paths = [paths[i] for i in order] if paths is not None else []
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise DicomInputError(f"input: expected slices of one size, got {sorted(shapes)}")
    slices = []
    for ds, name in zip(datasets, names):
        try:
            pixels = ds.pixel_array.astype(np.float64)
        except Exception as exc:  # pydicom raises several types for undecodable pixel data
            raise DicomInputError(f"{name}: expected decodable pixel data, got {exc}") from None
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        slices.append((pixels * slope + intercept).astype(np.float32))
    return CtSeries(np.stack(slices), datasets, ordered_paths)


def _instance_name(ds: Dataset, index: int) -> str:
    return f"instance {ds.get('SOPInstanceUID', index + 1)}"


def _check_slice(ds: Dataset, name: str) -> None:
    modality = getattr(ds, "Modality", None)
    if modality != "CT":
        raise DicomInputError(f"{name}: expected Modality CT, got {modality!r}")
    if "PixelData" not in ds:
        raise DicomInputError(f"{name}: expected Pixel Data (7FE0,0010), got none")
    if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
        raise DicomInputError(f"{name}: expected single-frame CT slices, got {ds.NumberOfFrames} frames")


def derived_ct_datasets(source: CtSeries, hu: np.ndarray, *, model_version: str, derivation: str) -> list[Dataset]:
    """The derived series (see the module docstring); ``hu`` is ``[N, H, W]`` in the source's order."""
    if hu.shape != source.hu.shape:
        raise ValueError(f"hu: expected the source's shape {source.hu.shape}, got {hu.shape}")
    series_uid = generate_uid()
    first = source.datasets[0]
    description = f"{getattr(first, 'SeriesDescription', '') or 'CT'} [denoised unet-{model_version}]"
    if len(description) > 64:
        description = description[-64:]
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = first.SeriesInstanceUID
    referenced_series.ReferencedInstanceSequence = DicomSequence([_sop_reference(ds) for ds in source.datasets])
    stored = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    out = []
    for ds_src, pixels in zip(source.datasets, stored):
        ds = Dataset()
        for keyword in COPIED:
            if keyword in ds_src:
                setattr(ds, keyword, ds_src.data_element(keyword).value)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(getattr(ds_src, "SeriesNumber", 0) or 0) + 1000
        ds.SeriesDescription = description
        third = list(getattr(ds_src, "ImageType", []))[2:3] or ["AXIAL"]
        ds.ImageType = ["DERIVED", "SECONDARY", *third]
        ds.DerivationDescription = derivation[:1024]
        ds.SourceImageSequence = DicomSequence([_sop_reference(ds_src)])
        ds.ReferencedSeriesSequence = DicomSequence([referenced_series])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.PixelData = pixels.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        out.append(ds)
    return out


def _sop_reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item
