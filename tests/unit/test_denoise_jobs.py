"""Denoising a stored CT series into a derived series: on Spark (local mode) and in this process."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("pyspark")

from denoise import jobs  # noqa: E402
from denoise.checkpoints import CheckpointError, save_checkpoint  # noqa: E402
from denoise.dicom_io import DicomInputError, ct_series_from_datasets, read_ct_series  # noqa: E402
from denoise.jobs import (  # noqa: E402
    TileOptions,
    denoise_partition,
    denoise_series,
    denoise_series_in_process,
    plan_partitions,
    prepare_checkpoint,
    read_stored_ct_series,
)
from denoise.model import UNet, UNetConfig  # noqa: E402
from pacs.cli.main import app  # noqa: E402
from pacs.errors import NotFound, SparkUnavailable  # noqa: E402
from pacs.index.models import Instance  # noqa: E402
from pacs.services import build_services  # noqa: E402
from pacs.settings import Settings  # noqa: E402
from pacs.synthetic import SeriesSpec, make_series  # noqa: E402
from reconstruct.jobs.archive import load_series  # noqa: E402

runner = CliRunner()
MASTER = "local[2]"
SLICES, SIDE = 6, 64
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny U-Net (width 4, depth 2) with random weights, version 'test'."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(width=4, depth=2))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "unet-test.pt", net, version="test")


@pytest.fixture(scope="module")
def wrong_shape_checkpoint(checkpoint, tmp_path_factory):
    """The tiny checkpoint's weights under a config that says width 8."""
    data = torch.load(checkpoint, weights_only=True)
    data["model"]["width"] = 8
    path = tmp_path_factory.mktemp("wrong") / "unet-wrong.pt"
    torch.save(data, path)
    return path


def _store(services, spec: SeriesSpec, *, drop_pixels: bool = False) -> str:
    for data in make_series(spec):
        if drop_pixels:
            ds = pydicom.dcmread(io.BytesIO(data))
            del ds.PixelData
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
        uid = services.ingest.store(data).series_instance_uid
    return uid


@pytest.fixture
def ct_series(embedded) -> str:
    """A stored CT series of 6 slices of 64 x 64: its SeriesInstanceUID."""
    return _store(embedded, SeriesSpec(series_key="ct", rows=SIDE, columns=SIDE, count=SLICES,
                                       series_description="AXIAL 1mm"))


def _instances(services) -> int:
    with services.db.session() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _check_derived(services, derived_uid: str, source_uid: str) -> list[pydicom.Dataset]:
    """The derived series read back from the archive, checked against its source slice by slice."""
    source = {str(ds.SOPInstanceUID): ds for ds in load_series(services, source_uid)}
    derived = load_series(services, derived_uid)
    assert len(derived) == len(source) == SLICES
    for ds in derived:
        assert ds.SeriesInstanceUID == derived_uid != source_uid and ds.SOPInstanceUID not in source
        src = source[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert (ds.Modality, ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.InstanceNumber) == \
            (src.Modality, src.StudyInstanceUID, src.FrameOfReferenceUID, src.InstanceNumber)
        for keyword in GEOMETRY:
            assert ds.data_element(keyword).value == src.data_element(keyword).value, keyword
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == "AXIAL 1mm [denoised unet-test]"
        assert "unet-test" in ds.DerivationDescription and "unet-test.pt" in ds.DerivationDescription
        referenced = ds.ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == source_uid
        assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(source)
        assert _hu(ds).shape == (SIDE, SIDE)
    return derived


# ---------------------------------------------------------------- no Spark needed
def test_datasets_from_the_archive_read_like_files(embedded, ct_series, tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for k, ds in enumerate(reversed(load_series(embedded, ct_series))):
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    from_files = read_ct_series(folder)
    stored = read_stored_ct_series(embedded, ct_series)
    np.testing.assert_array_equal(stored.hu, from_files.hu)
    assert [ds.SOPInstanceUID for ds in stored.datasets] == [ds.SOPInstanceUID for ds in from_files.datasets]
    assert stored.paths == [] and len(from_files.paths) == SLICES
    assert all("PixelData" not in ds for ds in stored.datasets)
    with pytest.raises(DicomInputError, match="instance .*: expected Modality CT, got 'MR'"):
        mr = load_series(embedded, ct_series)[:1]
        mr[0].Modality = "MR"
        ct_series_from_datasets(mr)


def test_partition_plan():
    assert plan_partitions(6, 4 * 64 * 64, 2, 256) == 2
    assert plan_partitions(6, 4 * 64 * 64, 16, 256) == 6  # never more partitions than slices
    assert plan_partitions(6, 4 * 64 * 64, 2, 256, requested=3) == 3
    # 1 MiB slices, 2 MiB of a 4 MiB task message left: 2 slices a task
    assert plan_partitions(10, 2**20, 2, 4) == 5
    with pytest.raises(ValueError, match="partitions: 2 partitions of 5 slices exceed.*at least 5"):
        plan_partitions(10, 2**20, 2, 4, requested=2)
    with pytest.raises(ValueError, match="does not fit in a task message"):
        plan_partitions(10, 3 * 2**20, 2, 4)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="partitions: expected a positive integer"):
            plan_partitions(6, 4, 2, 256, requested=bad)


def test_a_partition_task_loads_the_model_once_per_worker(checkpoint):
    prepared, net = prepare_checkpoint(checkpoint, TileOptions())
    shared = SimpleNamespace(value=prepared.data)  # what a Broadcast offers the task
    hu = np.random.default_rng(1).normal(0, 300, (3, 40, 24)).astype(np.float32)
    rows = [(k + 10, hu[k].tobytes()) for k in range(3)]
    task = dict(checkpoint=shared, sha256=prepared.sha256, name=prepared.name, shape_hw=(40, 24),
                options=TileOptions(tile_px=16, overlap_px=4), device="cpu")
    jobs._WORKER_MODELS.clear()
    first = list(denoise_partition(iter(rows), **task))
    cached = dict(jobs._WORKER_MODELS)
    shared.value = b"not read again"  # a reused worker keeps its model: the broadcast is not read
    second = list(denoise_partition(iter(rows), **task))
    assert jobs._WORKER_MODELS == cached and len(cached) == 1
    assert [i for i, _ in first] == [10, 11, 12] and first == second
    from denoise.infer import denoise_slices

    expected = denoise_slices(net, hu, tile_px=16, overlap_px=4)
    got = np.stack([np.frombuffer(b, np.float32).reshape(40, 24) for _, b in first])
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert list(denoise_partition(iter([]), **task)) == []


def test_in_process_job_stores_a_derived_series(embedded, ct_series, checkpoint):
    before = _instances(embedded)
    seen = []
    result = denoise_series_in_process(embedded, ct_series, model_path=checkpoint, device="cpu",
                                       progress=lambda done, total: seen.append((done, total)))
    assert (result.slices, result.model_version, result.spark_master) == (SLICES, "test", None)
    assert set(result.phases_s) == {"read", "denoise", "store"} and seen[-1][0] == seen[-1][1]
    assert _instances(embedded) == before + SLICES
    derived = _check_derived(embedded, result.series_instance_uid, ct_series)
    source = read_stored_ct_series(embedded, ct_series).hu
    assert 0 < np.abs(np.stack([_hu(ds) for ds in derived]) - source).mean() < 500  # changed, still HU


def test_bad_input_in_process_fails_clearly_and_stores_nothing(embedded, ct_series, checkpoint,
                                                              wrong_shape_checkpoint, tmp_path):
    mr = _store(embedded, SeriesSpec(series_key="mr", modality="MR", rows=16, columns=16, count=2))
    no_pixels = _store(embedded, SeriesSpec(series_key="np", rows=16, columns=16, count=2), drop_pixels=True)
    before = _instances(embedded)
    with pytest.raises(DicomInputError, match="expected Modality CT, got 'MR'"):
        denoise_series_in_process(embedded, mr, model_path=checkpoint)
    with pytest.raises(DicomInputError, match=r"expected Pixel Data \(7FE0,0010\), got none"):
        denoise_series_in_process(embedded, no_pixels, model_path=checkpoint)
    with pytest.raises(CheckpointError, match="expected weights for a U-Net of width 8 and depth 2"):
        denoise_series_in_process(embedded, ct_series, model_path=wrong_shape_checkpoint)
    with pytest.raises(CheckpointError, match="no such file"):
        denoise_series_in_process(embedded, ct_series, model_path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="tile_px: expected a positive multiple of 4"):
        denoise_series_in_process(embedded, ct_series, model_path=checkpoint, tile_px=30)
    with pytest.raises(NotFound, match="no stored series 1.2.3.999"):
        denoise_series_in_process(embedded, "1.2.3.999", model_path=checkpoint)
    assert _instances(embedded) == before


# ---------------------------------------------------------------- Spark local[2]
@pytest.mark.spark
def test_spark_job_equals_the_in_process_job(spark, embedded, ct_series, checkpoint):
    local = denoise_series_in_process(embedded, ct_series, model_path=checkpoint, device="cpu")
    seen = []
    distributed = denoise_series(embedded, ct_series, model_path=checkpoint, device="cpu", spark=spark,
                                 partitions=3, progress=lambda done, total: seen.append((done, total)))
    assert (distributed.slices, distributed.partitions, distributed.spark_master) == (SLICES, 3, MASTER)
    assert set(distributed.phases_s) == {"read", "denoise", "store"}
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    ours = _check_derived(embedded, distributed.series_instance_uid, ct_series)
    theirs = _check_derived(embedded, local.series_instance_uid, ct_series)
    for a, b in zip(ours, theirs):
        assert a.ImagePositionPatient == b.ImagePositionPatient
        assert np.abs(_hu(a) - _hu(b)).max() <= 1.0  # int16 HU of float results equal to rounding


@pytest.mark.spark
def test_bad_input_on_spark_fails_clearly_and_stores_nothing(spark, embedded, ct_series, checkpoint,
                                                            wrong_shape_checkpoint):
    mr = _store(embedded, SeriesSpec(series_key="mr", modality="MR", rows=16, columns=16, count=2))
    no_pixels = _store(embedded, SeriesSpec(series_key="np", rows=16, columns=16, count=2), drop_pixels=True)
    before = _instances(embedded)
    run = dict(model_path=checkpoint, spark=spark)
    with pytest.raises(DicomInputError, match="expected Modality CT, got 'MR'"):
        denoise_series(embedded, mr, **run)
    with pytest.raises(DicomInputError, match="expected Pixel Data"):
        denoise_series(embedded, no_pixels, **run)
    with pytest.raises(CheckpointError, match="expected weights for a U-Net of width 8"):
        denoise_series(embedded, ct_series, **{**run, "model_path": wrong_shape_checkpoint})
    with pytest.raises(NotFound, match="no stored series 1.2.3.999"):
        denoise_series(embedded, "1.2.3.999", **run)
    with pytest.raises(ValueError, match="partitions: expected a positive integer"):
        denoise_series(embedded, ct_series, partitions=0, **run)
    with pytest.raises(ValueError, match="Spark master: expected"):
        denoise_series(embedded, ct_series, model_path=checkpoint, master="sparky://h:1")
    with pytest.raises(SparkUnavailable, match="no Spark master answers"):
        denoise_series(embedded, ct_series, model_path=checkpoint, master="spark://127.0.0.1:9")
    assert _instances(embedded) == before


@pytest.mark.spark
def test_pacs_denoise_run(spark, tmp_path, checkpoint):
    data = tmp_path / "data"
    source = tmp_path / "ct"
    source.mkdir()
    for k, part10 in enumerate(make_series(SeriesSpec(series_key="cli", rows=32, columns=32, count=3))):
        (source / f"{k}.dcm").write_bytes(part10)
    assert runner.invoke(app, ["store", "--data-dir", str(data), str(source)]).exit_code == 0
    series_uid = str(pydicom.dcmread(source / "0.dcm", stop_before_pixels=True).SeriesInstanceUID)
    common = ["--model", str(checkpoint), "--device", "cpu", "--data-dir", str(data)]
    result = runner.invoke(app, ["denoise", "run", series_uid, "--master", MASTER, "--partitions", "2", *common])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps lines
    assert "3 slices denoised with unet-test (2 partitions on local[2])" in text
    # `pacs denoise SERIES_UID` is `pacs denoise run SERIES_UID`
    local = runner.invoke(app, ["denoise", series_uid, "--in-process", *common])
    assert local.exit_code == 0, local.output
    assert "3 slices denoised with unet-test" in " ".join(local.output.split()) and "partitions" not in local.output
    new_uids = [out.output.strip().splitlines()[-1] for out in (result, local)]  # the last line, on stdout
    with build_services(Settings(data_dir=data)) as services:
        for new_uid in new_uids:
            derived = load_series(services, new_uid)
            assert len(derived) == 3 and derived[0].ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    for args, message in [
        (["1.2.3"], "no stored series 1.2.3"),
        ([series_uid, "--master", "spark:/nowhere"], "Spark master: expected"),
        ([series_uid, "--tile-px", "30"], "tile_px: expected a positive multiple"),
    ]:
        bad = runner.invoke(app, ["denoise", "run", *args, *common])
        assert bad.exit_code == 1 and message in " ".join(bad.output.split()), bad.output
    typo = runner.invoke(app, ["denoise", "trian", *common])  # not a UID: still an unknown command
    assert typo.exit_code == 2 and "No such command 'trian'" in typo.output
