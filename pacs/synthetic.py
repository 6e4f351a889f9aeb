"""Synthetic DICOM objects for tests, benchmarks and the demo.

Builds valid Part 10 CT/MR instances in memory with pydicom — deterministic
from a seed, so the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

_ROOT = "1.2.826.0.1.3680043.10.1484."  # test UIDs: pydicom's registered root plus a project arc


def uid(*parts: object) -> str:
    """A deterministic UID from the given parts (at most 64 characters)."""
    return generate_uid(prefix=_ROOT, entropy_srcs=[str(p) for p in parts])


@dataclass(frozen=True)
class SeriesSpec:
    patient_id: str = "PAT001"
    patient_name: str = "DOE^JANE"
    study_key: str = "study-1"
    series_key: str = "series-1"
    modality: str = "CT"
    rows: int = 512
    columns: int = 512
    count: int = 10
    study_date: str = "20260115"
    study_time: str = "101500"
    series_number: int = 1
    series_description: str = "AXIAL 1mm"
    accession_number: str = "ACC001"
    implicit_vr: bool = False


def make_instance(spec: SeriesSpec, index: int, *, seed: int = 0) -> bytes:
    """One instance of ``spec`` as Part 10 bytes (pixel data: 16-bit noise + a ramp)."""
    rng = np.random.default_rng(zlib.crc32(f"{seed}/{spec.series_key}/{index}".encode()))
    sop_class = CTImageStorage if spec.modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid(spec.study_key, spec.series_key, index, seed)
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if spec.implicit_vr else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = spec.patient_id
    ds.PatientName = spec.patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = uid(spec.study_key)
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.StudyID = spec.study_key[-16:]
    ds.AccessionNumber = spec.accession_number
    ds.StudyDescription = "SYNTHETIC " + spec.study_key
    ds.ReferringPhysicianName = "SMITH^JOHN"
    ds.SeriesInstanceUID = uid(spec.study_key, spec.series_key)
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.series_description
    ds.Modality = spec.modality
    ds.BodyPartExamined = "CHEST"
    ds.FrameOfReferenceUID = uid(spec.study_key, "for")
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    pixels = rng.integers(0, 2000, size=(spec.rows, spec.columns), dtype=np.int16)
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=spec.implicit_vr, little_endian=True)
    return buffer.getvalue()


def make_series(spec: SeriesSpec, *, seed: int = 0) -> Iterator[bytes]:
    for index in range(spec.count):
        yield make_instance(spec, index, seed=seed)


def make_study_set(
    studies: int, series_per_study: int, instances_per_series: int, *, rows: int = 64, columns: int = 64
) -> Iterator[bytes]:
    """Instances of ``studies`` studies over a few patients, modalities alternating CT/MR."""
    for s in range(studies):
        for k in range(series_per_study):
            spec = SeriesSpec(
                patient_id=f"PAT{s % 7:03d}",
                patient_name=f"PATIENT^{s % 7:03d}",
                study_key=f"study-{s}",
                series_key=f"series-{s}-{k}",
                modality="CT" if k % 2 == 0 else "MR",
                rows=rows,
                columns=columns,
                count=instances_per_series,
                study_date=f"2026{1 + s % 12:02d}{1 + s % 28:02d}",
                series_number=k + 1,
                accession_number=f"ACC{s:05d}",
            )
            yield from make_series(spec)
