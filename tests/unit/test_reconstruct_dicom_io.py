"""reconstruct.dicom_io: projection DICOM -> geometry + line integrals -> FDK -> CT series."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

torch = pytest.importorskip("torch")

from reconstruct.dicom_io import (  # noqa: E402
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    RTK_TO_PATIENT,
    geometry_from_projection_datasets,
    volume_to_ct_datasets,
)
from reconstruct.fdk import fdk  # noqa: E402
from reconstruct.geometry import ConeBeamGeometry, VolumeGrid  # noqa: E402
from reconstruct.phantom import project_ellipsoids, sphere  # noqa: E402

SID, SDD = 500.0, 1000.0
NU, NV = 64, 48
DU, DV = 2.0, 2.5  # column and row pitch at the detector (anisotropic on purpose)
N = 90
START_DEG = -90.0
MU_WATER = 0.0195
BALL = sphere(20.0, density_per_mm=2 * MU_WATER)  # HU 1000
SLOPE = 1.0 / 20000.0  # line integrals <= 1.6 -> stored <= 32000


def _geometry(**offsets) -> ConeBeamGeometry:
    return ConeBeamGeometry.circular(
        N, source_to_isocenter_mm=SID, source_to_detector_mm=SDD, detector_size_uv=(NU, NV),
        detector_spacing_uv_mm=(DU, DV), first_angle_deg=START_DEG, **offsets,
    )


def _base(sop_class=XRayAngiographicImageStorage) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "P-42", "19700101", "F"
    ds.Modality = "XA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = NV, NU
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = pydicom.valuerep.format_number_as_ds(SLOPE), "0"
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = SDD, SID
    ds.ImagerPixelSpacing = [DV, DU]  # (row spacing, column spacing)
    return ds


def _encode(line_integrals: np.ndarray) -> bytes:
    return np.rint(line_integrals / SLOPE).astype("<u2").tobytes()


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True)


def multi_frame(projections: np.ndarray, geometry: ConeBeamGeometry, *, mode="offsets", study=None) -> Dataset:
    ds = _base()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.NumberOfFrames = geometry.n_projections
    ds.FrameIncrementPointer = 0x00181520
    ds.PositionerMotion = "DYNAMIC"
    deg = np.degrees(geometry.angles_rad)
    ds.PositionerPrimaryAngle = float(deg[0])
    inc = deg - deg[0] if mode == "offsets" else np.diff(deg, prepend=deg[0])
    ds.PositionerPrimaryAngleIncrement = [pydicom.valuerep.format_number_as_ds(float(v)) for v in inc]
    ds.PixelData = _encode(projections)
    return _roundtrip(ds)


def single_frames(projections: np.ndarray, geometry: ConeBeamGeometry, *, offsets=False) -> list[Dataset]:
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(geometry.n_projections):
        ds = _base()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.PositionerPrimaryAngle = pydicom.valuerep.format_number_as_ds(float(np.degrees(geometry.angles_rad[k])))
        if offsets:
            block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
            block.add_new(0x01, "FD", float(geometry.projection_offset_x_mm[k]))
            block.add_new(0x02, "FD", float(geometry.projection_offset_y_mm[k]))
        ds.PixelData = _encode(projections[k])
        out.append(_roundtrip(ds))
    rng = np.random.default_rng(3)
    return [out[i] for i in rng.permutation(len(out))]  # order must come from InstanceNumber


@pytest.fixture(scope="module")
def truth():
    g = _geometry()
    return g, project_ellipsoids([BALL], g)


def _check_geometry(read: ConeBeamGeometry, expected: ConeBeamGeometry) -> None:
    np.testing.assert_allclose(read.angles_rad, expected.angles_rad, atol=1e-12)
    np.testing.assert_array_equal(read.source_to_isocenter_mm, SID)
    np.testing.assert_array_equal(read.source_to_detector_mm, SDD)
    assert read.detector_size_uv == (NU, NV)
    assert read.detector_spacing_uv_mm == (DU, DV)
    assert read.detector_origin_uv_mm == expected.detector_origin_uv_mm


def test_multi_frame_offsets_round_trip_and_fdk(truth):
    g, p = truth
    read, proj = geometry_from_projection_datasets([multi_frame(p, g)])
    _check_geometry(read, g)
    assert proj.dtype == np.float32 and proj.shape == (N, NV, NU)
    assert np.max(np.abs(proj - p)) <= SLOPE / 2 + 1e-6
    vol = fdk(proj, read, VolumeGrid(24, 2.5))
    centre = vol[8:16, 8:16, 8:16].mean()
    assert abs(centre / (2 * MU_WATER) - 1) < 0.02, centre
    assert abs(vol[0, 0, 0]) < 0.1 * MU_WATER


def test_multi_frame_cumulative_mode_and_single_increment(truth):
    g, p = truth
    read, _ = geometry_from_projection_datasets(multi_frame(p, g, mode="cumulative"), increment_mode="cumulative")
    np.testing.assert_allclose(read.angles_rad, g.angles_rad, atol=1e-9)
    ds = multi_frame(p, g)
    ds.PositionerPrimaryAngleIncrement = 360.0 / N  # VM 1: the average step per frame
    read, _ = geometry_from_projection_datasets(ds)
    np.testing.assert_allclose(read.angles_rad, g.angles_rad, atol=1e-12)
    with pytest.raises(ValueError, match="increment_mode: expected one of"):
        geometry_from_projection_datasets(ds, increment_mode="deltas")


def test_single_frame_series_sorted_by_instance_number_with_private_offsets():
    g = _geometry(projection_offset_x_mm=np.linspace(-3, 3, N), projection_offset_y_mm=1.5)
    p = project_ellipsoids([BALL], g)
    read, proj = geometry_from_projection_datasets(single_frames(p, g, offsets=True))
    _check_geometry(read, g)
    np.testing.assert_allclose(read.projection_offset_x_mm, g.projection_offset_x_mm)
    np.testing.assert_array_equal(read.projection_offset_y_mm, 1.5)
    np.testing.assert_array_equal(read.source_offset_y_mm, 0.0)
    assert np.max(np.abs(proj - p)) <= SLOPE / 2 + 1e-6
    vol = fdk(proj, read, VolumeGrid(24, 2.5))
    assert abs(vol[8:16, 8:16, 8:16].mean() / (2 * MU_WATER) - 1) < 0.02


def test_clear_errors(truth):
    g, p = truth
    mf = multi_frame(p, g)
    del mf.DistanceSourceToPatient
    with pytest.raises(ValueError, match=r"expected DistanceSourceToPatient \(0018,1111\), got none"):
        geometry_from_projection_datasets(mf)
    mf = multi_frame(p, g)
    mf.PositionerPrimaryAngleIncrement = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=rf"expected 1 or {N} value\(s\) in PositionerPrimaryAngleIncrement"):
        geometry_from_projection_datasets(mf)
    mf = multi_frame(p, g)
    mf.Rows = NV + 1
    with pytest.raises(ValueError, match=rf"expected decodable pixel data of {N} frame\(s\) of {NV + 1} x {NU}"):
        geometry_from_projection_datasets(mf)

    small = _geometry().subset(slice(0, 4))
    frames = single_frames(p[:4], small)
    next(ds for ds in frames if ds.InstanceNumber == 3).Columns = NU - 2
    with pytest.raises(ValueError, match=rf"expected Rows x Columns {NV} x {NU} as the first projection, "
                                         rf"got {NV} x {NU - 2}"):
        geometry_from_projection_datasets(frames)
    frames = single_frames(p[:4], small)
    frames[2].ImagerPixelSpacing = [DV, DU * 2]
    with pytest.raises(ValueError, match="expected ImagerPixelSpacing"):
        geometry_from_projection_datasets(frames)
    frames = single_frames(p[:4], small)
    frames[0].SeriesInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="mixed series"):
        geometry_from_projection_datasets(frames)
    with pytest.raises(ValueError, match="expected at least 2 projections, got 1"):
        geometry_from_projection_datasets(frames[:1])
    with pytest.raises(ValueError, match="one multi-frame instance or single-frame instances only"):
        geometry_from_projection_datasets([multi_frame(p, g), frames[1]])
    frames = single_frames(p[:4], small)
    del frames[3].PositionerPrimaryAngle
    with pytest.raises(ValueError, match=r"expected PositionerPrimaryAngle \(0018,1510\), got none"):
        geometry_from_projection_datasets(frames)


def test_ct_series_round_trip(truth):
    g, p = truth
    src = multi_frame(p, g)
    grid = VolumeGrid((20, 12, 16), (2.0, 3.0, 2.5), (-19.0, -15.0, -20.0))
    rng = np.random.default_rng(0)
    vol = (MU_WATER * (1 + rng.uniform(-1.0, 2.0, grid.shape))).astype(np.float32)
    when = dt.datetime(2024, 5, 6, 7, 8, 9)
    out = volume_to_ct_datasets(vol, grid, source=src, series_description="FDK test", series_number=901,
                                derivation_description="FDK ram-lak", content_datetime=when)
    assert len(out) == grid.dimension_xyz[1]
    expected_hu = 1000.0 * (vol.astype(np.float64) - MU_WATER) / MU_WATER
    series = {ds.SeriesInstanceUID for ds in out}
    assert len(series) == 1 and series != {src.SeriesInstanceUID}
    assert len({ds.SOPInstanceUID for ds in out}) == len(out)
    for j, built in enumerate(out):
        buf = io.BytesIO()
        built.save_as(buf, enforce_file_format=True)
        ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert ds.InstanceNumber == j + 1 and ds.SeriesNumber == 901
        assert ds.SeriesDescription == "FDK test" and ds.DerivationDescription == "FDK ram-lak"
        assert (ds.ContentDate, ds.ContentTime[:6]) == ("20240506", "070809")
        for key in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "FrameOfReferenceUID"):
            assert ds[key].value == src[key].value, key
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        ref = ds.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == src.SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        arr = ds.pixel_array
        assert arr.dtype == np.int16 and arr.shape == (grid.shape[0], grid.shape[2])
        hu = arr * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert ds.RescaleType == "HU"
        np.testing.assert_array_less(np.abs(hu - expected_hu[:, j, ::-1]), 1.0)
        # Geometry: every pixel's patient position maps back to its voxel's RTK position.
        ipp, iop = np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        np.testing.assert_allclose(iop, [1, 0, 0, 0, 1, 0])
        r, c = 5, 7
        patient = ipp + c * dc * iop[:3] + r * dr * iop[3:]
        i, k = grid.dimension_xyz[0] - 1 - c, r
        rtk = np.array([grid.axis_mm("x")[i], grid.axis_mm("y")[j], grid.axis_mm("z")[k]])
        np.testing.assert_allclose(patient, RTK_TO_PATIENT @ rtk, atol=1e-9)
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 3.0
        assert float(ds.SliceLocation) == pytest.approx(ipp[2])
    # Slices advance along the slice normal by SpacingBetweenSlices.
    z = [float(ds.ImagePositionPatient[2]) for ds in out]
    np.testing.assert_allclose(np.diff(z), 3.0)


def test_ct_series_from_reconstruction_generates_frame_of_reference(truth):
    g, p = truth
    frames = single_frames(p[::10], g.subset(slice(None, None, 10)))
    for ds in frames:
        del ds.FrameOfReferenceUID
    grid = VolumeGrid(16, 3.0)
    g2, proj = geometry_from_projection_datasets(frames)
    vol = fdk(proj, g2, grid)
    out = volume_to_ct_datasets(vol, grid, source=frames, series_description="recon")
    assert len({ds.FrameOfReferenceUID for ds in out}) == 1 and out[0].FrameOfReferenceUID
    assert len(out[0].SourceImageSequence) == len(frames)
    assert len(out[0].ReferencedSeriesSequence) == 1
    assert len(out[0].ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(frames)
    assert out[0].SeriesNumber == ""
    with pytest.raises(ValueError, match=r"volume: expected shape \(16, 16, 16\)"):
        volume_to_ct_datasets(vol[:, :3], grid, source=frames[0], series_description="x")
