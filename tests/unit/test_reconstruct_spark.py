"""FDK in slabs on Spark (local mode) against the single-process reconstruction."""

from __future__ import annotations

import io
import socket

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("pyspark")

from pacs.cli.main import app  # noqa: E402
from pacs.errors import JobFailed, NotFound, SparkUnavailable  # noqa: E402
from pacs.index.models import Instance, Series  # noqa: E402
from pacs.index.repository import LOCATION_COLUMNS, location_of  # noqa: E402
from pacs.spark import check_master  # noqa: E402
from reconstruct.dicom_io import projections_to_multiframe  # noqa: E402
from reconstruct.fdk import fdk  # noqa: E402
from reconstruct.geometry import ConeBeamGeometry, VolumeGrid  # noqa: E402
from reconstruct.jobs.archive import reconstruct_series  # noqa: E402
from reconstruct.jobs.spark import (  # noqa: E402
    Slab,
    default_slab_count,
    plan_slabs,
    reconstruct_series_spark,
    reconstruct_slab,
    reconstruct_volume_spark,
)
from reconstruct.phantom import project_ellipsoids, shepp_logan_3d  # noqa: E402

runner = CliRunner()
MASTER = "local[2]"


def _scan(**offsets) -> tuple[ConeBeamGeometry, np.ndarray]:
    """90 exact projections (64 x 64 pixels of 4 mm, magnification 2) of a 50 mm Shepp-Logan head."""
    geometry = ConeBeamGeometry.circular(90, source_to_isocenter_mm=500.0, source_to_detector_mm=1000.0,
                                         detector_size_uv=64, detector_spacing_uv_mm=4.0, **offsets)
    return geometry, project_ellipsoids(shepp_logan_3d(50.0, density_scale=0.02), geometry)


GRID = VolumeGrid(64, 1.8)  # 115 mm cube: the detector covers 128 mm at the isocentre


def _close(volume: np.ndarray, reference: np.ndarray) -> None:
    assert volume.shape == reference.shape and volume.dtype == np.float32
    assert np.abs(volume - reference).max() <= 1e-5 * np.abs(reference).max()


# ---------------------------------------------------------------- no Spark needed
def test_slab_plan_covers_y_with_every_slab_non_empty():
    geometry, _ = _scan()
    for count in (1, 2, 5, 7, 64, 100):
        plan = plan_slabs(geometry, GRID, count)
        assert len(plan) == min(count, 64)
        assert [s.index for s in plan] == list(range(len(plan)))
        assert plan[0].y_start == 0 and plan[-1].y_stop == 64
        assert all(a.y_stop == b.y_start for a, b in zip(plan, plan[1:]))
        assert all(s.y_stop - s.y_start >= 1 and s.row_stop - s.row_start >= 2 for s in plan)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="slabs: expected a positive integer"):
            plan_slabs(geometry, GRID, bad)
    assert default_slab_count(geometry, GRID, 1, 1000) == 2
    assert default_slab_count(geometry, GRID, 4, 1000) == 4
    # a band of the whole detector is 90 * 64 * 64 * 4 bytes = 1.4 MiB: a 0.4 MiB budget needs more slabs
    count = default_slab_count(geometry, GRID, 2, 0.4)
    assert max(s.band_bytes(geometry) for s in plan_slabs(geometry, GRID, count)) <= 0.4 * 2**20 < \
        max(s.band_bytes(geometry) for s in plan_slabs(geometry, GRID, count - 1))


def test_one_slab_from_its_band_equals_the_full_reconstruction():
    geometry, projections = _scan()
    reference = fdk(projections, geometry, GRID, filter="hann")
    slab = plan_slabs(geometry, GRID, 5)[2]
    band = projections[:, slab.row_start:slab.row_stop, :]
    assert band.shape[1] < 64
    _close(reconstruct_slab(band, geometry, GRID, slab, filter="hann"), reference[:, slab.y_start:slab.y_stop, :])
    missing = Slab(0, 3, 5, 0, 0)
    assert not reconstruct_slab(projections[:, :0, :], geometry, GRID, missing).any()


def test_master_urls_are_checked():
    for good in ("local", "local[*]", "local[4]", "local[2,3]", " local[2] ", "yarn", "k8s://https://k:6443"):
        assert check_master(good) == good.strip()
    for bad in ("", "locl[2]", "local[0]", "local[two]", "spark://", "spark://host", "spark://h:99999", "http://h:1"):
        with pytest.raises(ValueError, match="Spark master: expected"):
            check_master(bad)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SparkUnavailable, match=f"no Spark master answers at spark://127.0.0.1:{port}.*deploy/spark.sh"):
        check_master(f"spark://127.0.0.1:{port}", connect_timeout_s=1)


# ---------------------------------------------------------------- Spark local[2]
@pytest.mark.spark
@pytest.mark.parametrize("slabs", [None, 5])  # default (2 = parallelism) and a count that does not divide ny = 64
def test_slab_split_spark_equals_single_process(spark, slabs):
    geometry, projections = _scan()
    reference = fdk(projections, geometry, GRID, filter="hann")
    seen = []
    volume, plan = reconstruct_volume_spark(spark, projections, geometry, GRID, filter="hann", slabs=slabs,
                                            progress=lambda done, total: seen.append((done, total)))
    assert len(plan) == (slabs or 2)
    assert all(s.row_stop - s.row_start < 64 for s in plan)  # each task got only a band of rows
    _close(volume, reference)
    assert seen[0] == (0, len(plan)) and seen[-1] == (len(plan), len(plan))


@pytest.mark.spark
def test_detector_offset_some_slabs_miss_the_detector_or_see_few_rows(spark):
    # The detector shifted by 200 mm along the rotation axis sees only the top of the volume.
    geometry, projections = _scan(projection_offset_y_mm=-200.0)
    reference = fdk(projections, geometry, GRID, filter="ram-lak")
    plan = plan_slabs(geometry, GRID, 9)
    missing = [s for s in plan if s.misses_detector]
    thin = [s for s in plan if 0 < s.row_stop - s.row_start <= 6]
    assert missing and thin
    volume, used = reconstruct_volume_spark(spark, projections, geometry, GRID, filter="ram-lak", slabs=9)
    assert used == plan
    _close(volume, reference)
    for slab in missing:
        assert not volume[:, slab.y_start:slab.y_stop, :].any()
    assert np.abs(reference).max() > 0


@pytest.mark.spark
def test_failing_task_is_reported_as_job_failure(spark):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to make the executors fail")
    geometry, projections = _scan()
    with pytest.raises(JobFailed, match="FDK failed on Spark.*device: expected an available device"):
        reconstruct_volume_spark(spark, projections, geometry, GRID, device="cuda")


def _stored_series(services, series_uid: str) -> list[pydicom.Dataset]:
    with services.db.session() as session:
        rows = session.execute(
            select(*LOCATION_COLUMNS)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.series_instance_uid == series_uid).order_by(Instance.instance_number)).all()
    return [pydicom.dcmread(io.BytesIO(services.objects.get(location_of(row)))) for row in rows]


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.fixture
def projection_series(embedded):
    """A simulated scan stored in the embedded archive: its SeriesInstanceUID."""
    geometry = ConeBeamGeometry.circular(72, source_to_isocenter_mm=500.0, source_to_detector_mm=1000.0,
                                         detector_size_uv=48, detector_spacing_uv_mm=4.0)
    projections = project_ellipsoids(shepp_logan_3d(40.0, density_scale=0.0195), geometry)
    buffer = io.BytesIO()
    projections_to_multiframe(projections, geometry).save_as(buffer, enforce_file_format=True)
    return embedded.ingest.store(buffer.getvalue()).series_instance_uid


@pytest.mark.spark
def test_stored_series_equals_the_in_process_archive_job(spark, embedded, projection_series):
    shape = dict(dimension=(32, 24, 32), spacing=4.0, filter="hann", device="cpu")
    local = reconstruct_series(embedded, projection_series, **shape)
    distributed = reconstruct_series_spark(embedded, projection_series, spark=spark, slabs=5, **shape)
    assert (distributed.slices, distributed.slabs, distributed.spark_master) == (24, 5, MASTER)
    assert local.spark_master is None and set(distributed.phases_s) >= {"read", "reconstruct", "store"}
    ours, theirs = _stored_series(embedded, distributed.series_instance_uid), _stored_series(
        embedded, local.series_instance_uid)
    assert len(ours) == len(theirs) == 24
    for a, b in zip(ours, theirs):
        assert (a.Modality, a.SeriesDescription, a.StudyInstanceUID, a.FrameOfReferenceUID) == \
            (b.Modality, b.SeriesDescription, b.StudyInstanceUID, b.FrameOfReferenceUID)
        assert a.ImagePositionPatient == b.ImagePositionPatient and a.InstanceNumber == b.InstanceNumber
        assert a.ReferencedSeriesSequence[0].SeriesInstanceUID == projection_series
        assert np.abs(_hu(a) - _hu(b)).max() <= 1.0  # int16 HU of volumes equal to float rounding


@pytest.mark.spark
def test_unknown_series_or_bad_master_fails_clearly_and_stores_nothing(spark, embedded, projection_series):
    with pytest.raises(NotFound, match="no stored series 1.2.3.999"):
        reconstruct_series_spark(embedded, "1.2.3.999", dimension=16, spacing=4.0, spark=spark)
    with pytest.raises(ValueError, match="Spark master: expected"):
        reconstruct_series_spark(embedded, projection_series, dimension=16, spacing=4.0, master="sparky://h:1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SparkUnavailable, match="no Spark master answers"):
        reconstruct_series_spark(embedded, projection_series, dimension=16, spacing=4.0,
                                 master=f"spark://127.0.0.1:{port}")
    with pytest.raises(ValueError, match="Spark master: expected 'local\\[1\\]'.*already runs"):
        reconstruct_series_spark(embedded, projection_series, dimension=16, spacing=4.0, master="local[1]")
    with pytest.raises(ValueError, match="filter: expected one of"):
        reconstruct_series_spark(embedded, projection_series, dimension=16, spacing=4.0, filter="box", spark=spark)
    with embedded.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Series)) == 1


@pytest.mark.spark
def test_pacs_reconstruct_on_spark(spark, tmp_path):
    scan = tmp_path / "scan.dcm"
    assert runner.invoke(app, ["synth-projections", str(scan), "--views", "36", "--detector", "24",
                               "--pixel-mm", "8", "--radius-mm", "40"]).exit_code == 0
    data = tmp_path / "data"
    assert runner.invoke(app, ["store", "--data-dir", str(data), str(scan)]).exit_code == 0
    series_uid = str(pydicom.dcmread(scan, stop_before_pixels=True).SeriesInstanceUID)
    result = runner.invoke(app, ["reconstruct", series_uid, "--dimension", "16", "--spacing", "6",
                                 "--master", MASTER, "--slabs", "3", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert f"16 slices (3 slabs on {MASTER})" in " ".join(result.output.split())  # rich wraps lines
    missing = runner.invoke(app, ["reconstruct", "1.2.3", "--master", MASTER, "--data-dir", str(data)])
    assert missing.exit_code == 1 and "no stored series 1.2.3" in missing.output
    bad = runner.invoke(app, ["reconstruct", series_uid, "--master", "spark:/nowhere", "--data-dir", str(data)])
    assert bad.exit_code == 1 and "Spark master: expected" in bad.output
