"""``pacs denoise-file``: .npy and DICOM in, same shape / a derived series out; bad input writes nothing."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from denoise.checkpoints import CheckpointError, default_checkpoint, export_checkpoint, load_checkpoint, save_checkpoint
from denoise.model import UNet, UNetConfig
from pacs.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = UNet(UNetConfig(width=4, depth=2))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "unet-test.pt", net, version="test", half=True)


@pytest.fixture
def ct_folder(tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "ct"
    folder.mkdir()
    for k in range(2):  # two slices of one series
        ds = source.copy()
        ds.SOPInstanceUID = f"{source.SOPInstanceUID}.{k + 1}"
        ds.ImagePositionPatient = [source.ImagePositionPatient[0], source.ImagePositionPatient[1],
                                   float(source.ImagePositionPatient[2]) + 5.0 * k]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"slice{k}.dcm")
    return folder


def _run(*args):
    return runner.invoke(app, ["denoise-file", *map(str, args)])


def test_npy_in_npy_out_same_shape(tmp_path, checkpoint):
    for shape in [(2, 40, 37), (33, 20)]:
        source = tmp_path / f"in{len(shape)}.npy"
        np.save(source, np.random.default_rng(0).normal(0, 100, shape).astype(np.float32))
        out = tmp_path / f"out{len(shape)}.npy"
        result = _run(source, out, "--model", checkpoint, "--tile-px", 16, "--overlap-px", 4)
        assert result.exit_code == 0, result.output
        assert np.load(out).shape == shape and np.load(out).dtype == np.float32


def test_dicom_in_derived_series_out(tmp_path, ct_folder, checkpoint):
    out = tmp_path / "denoised"
    result = _run(ct_folder, out, "--model", checkpoint)
    assert result.exit_code == 0, result.output
    files = sorted(out.iterdir())
    assert len(files) == 2
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in ct_folder.iterdir())}
    written = [pydicom.dcmread(p) for p in files]
    first_source = next(iter(sources.values()))
    assert len({ds.SeriesInstanceUID for ds in written}) == 1
    for ds in written:
        assert ds.SeriesInstanceUID != first_source.SeriesInstanceUID
        assert ds.SOPInstanceUID not in sources
        assert ds.FrameOfReferenceUID == first_source.FrameOfReferenceUID
        assert ds.StudyInstanceUID == first_source.StudyInstanceUID
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert "unet-test" in ds.SeriesDescription and "unet-test" in ds.DerivationDescription
        src = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert ds.ImagePositionPatient == src.ImagePositionPatient and ds.PixelSpacing == src.PixelSpacing
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first_source.SeriesInstanceUID
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu.shape == src.pixel_array.shape
        assert np.abs(hu - (src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept))).mean() < 200


def _assert_failed_and_wrote_nothing(result, out, *fragments):
    assert result.exit_code != 0
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_non_ct_modality_fails_clearly(tmp_path, checkpoint):
    out = tmp_path / "out"
    result = _run(get_testdata_file("MR_small.dcm"), out, "--model", checkpoint)
    _assert_failed_and_wrote_nothing(result, out, "expected Modality CT", "'MR'")


def test_missing_pixel_data_fails_clearly(tmp_path, checkpoint):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    source = tmp_path / "nopixels.dcm"
    ds.save_as(source)
    out = tmp_path / "out"
    _assert_failed_and_wrote_nothing(_run(source, out, "--model", checkpoint), out, "Pixel Data")


def test_wrong_checkpoint_shape_fails_clearly(tmp_path, checkpoint, ct_folder):
    data = torch.load(checkpoint, weights_only=True)
    data["model"]["width"] = 8  # the weights are for width 4
    broken = tmp_path / "broken.pt"
    torch.save(data, broken)
    with pytest.raises(CheckpointError, match="width 8"):
        load_checkpoint(broken)
    out = tmp_path / "out"
    _assert_failed_and_wrote_nothing(_run(ct_folder, out, "--model", broken), out, "width 8", "broken.pt")
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((16, 16), np.float32))
    out_npy = tmp_path / "y.npy"
    _assert_failed_and_wrote_nothing(_run(npy, out_npy, "--model", tmp_path / "missing.pt"), out_npy, "missing.pt")


def test_bad_npy_and_existing_output_fail(tmp_path, checkpoint):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, 3, 4, 5), np.float32))
    out = tmp_path / "y.npy"
    _assert_failed_and_wrote_nothing(_run(npy, out, "--model", checkpoint), out, "(2, 3, 4, 5)")
    out.write_bytes(b"keep")
    result = _run(npy, out, "--model", checkpoint)
    assert result.exit_code != 0 and "exists" in result.output and out.read_bytes() == b"keep"


@pytest.mark.skipif(not default_checkpoint().exists(), reason="the default checkpoint is not in this checkout")
def test_default_checkpoint_loads():
    net, meta = load_checkpoint()
    assert meta["version"] and net.parameter_count() < 5_000_000


def test_an_exported_checkpoint_is_float16_renamed_and_computes_the_same(tmp_path):
    torch.manual_seed(1)
    net = UNet(UNetConfig(width=4, depth=2))
    for p in net.parameters():  # not the residual net's zero last layer, under which any weights give the input back
        torch.nn.init.normal_(p, std=0.05)
    source = save_checkpoint(tmp_path / "run" / "unet-1.9b.pt", net, version="1.9b", metrics={"val_psnr_db": 40.0},
                             training={"config": {"version": "1.9b"}})
    shipped = export_checkpoint(source, tmp_path / "unet-1.9.pt", version="1.9", note="run b")
    loaded, meta = load_checkpoint(shipped)
    assert meta["version"] == "1.9" and meta["weights_dtype"] == "float16" and meta["metrics"]["val_psnr_db"] == 40.0
    assert meta["training"]["exported_from"] == "unet-1.9b.pt" and meta["training"]["note"] == "run b"
    assert shipped.stat().st_size < source.stat().st_size * 0.75
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        expected = net(x)
        assert (expected - x).abs().max() > 0.05 and torch.allclose(loaded(x), expected, atol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--dose-range", "2"], "expected two factors LO,HI"),
    (["--dose-range", "4,1"], "dose_range: expected factors 0 < lo <= hi"),
    (["--grain-fraction", "1.5"], "grain-fraction"),
])
def test_training_data_options_are_checked(tmp_path, args, message):
    result = runner.invoke(app, ["denoise", "train", "--out-dir", str(tmp_path / "run"),
                                 "--cache-dir", str(tmp_path / "cache"), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "cache").exists()  # refused before anything was simulated


def test_simulate_only_fills_the_cache_that_a_run_then_finds(tmp_path):
    from denoise.dataset import SimulationConfig, simulate_pair_set

    options = ["--cache-dir", str(tmp_path / "cache"), "--train-slices", "1", "--val-slices", "1",
               "--dead-leaves-fraction", "1", "--dead-leaves-edge-px", "4"]
    result = runner.invoke(app, ["denoise", "train", "--out-dir", str(tmp_path / "run"), "--simulate-only", *options])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "cache").glob("*/slice-*.npz"))
    assert len(files) == 2 and "simulated in" in result.output
    assert not (tmp_path / "run").exists()  # nothing trained
    # the same data options name the same folders: a run started now simulates nothing
    stamps = [f.stat().st_mtime_ns for f in files]
    config = SimulationConfig(dead_leaves_fraction=1.0, dead_leaves_edge_px=4.0)
    again = [simulate_pair_set(tmp_path / "cache", seed, 1, config)[0] for seed in (1000, 2000)]
    assert sorted(again) == files and [f.stat().st_mtime_ns for f in files] == stamps


@pytest.mark.parametrize("native, expected", [(True, "bfloat16, self-ensemble of 4)"), (False, "float32)")])
def test_the_default_precision_and_ensemble_follow_the_cpu_and_are_named(tmp_path, ct_folder, checkpoint,
                                                                         monkeypatch, native, expected):
    import denoise.infer

    monkeypatch.setattr(denoise.infer, "cpu_has_native_bfloat16", lambda: native)
    out = tmp_path / "denoised"
    result = _run(ct_folder, out, "--model", checkpoint, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert all(pydicom.dcmread(path).DerivationDescription.endswith(expected) for path in out.iterdir())
    # an explicit option wins over the default
    result = _run(ct_folder, tmp_path / "one", "--model", checkpoint, "--device", "cpu", "--ensemble", 1)
    assert result.exit_code == 0 and "self-ensemble" not in pydicom.dcmread(
        next((tmp_path / "one").iterdir())).DerivationDescription


def test_a_self_ensemble_is_named_in_the_derivation(tmp_path, ct_folder, checkpoint):
    out = tmp_path / "denoised"
    result = _run(ct_folder, out, "--model", checkpoint, "--ensemble", 4)
    assert result.exit_code == 0, result.output
    for path in out.iterdir():
        assert "self-ensemble of 4" in pydicom.dcmread(path).DerivationDescription
    result = _run(ct_folder, tmp_path / "other", "--model", checkpoint, "--ensemble", 3)
    assert result.exit_code != 0 and "ensemble: expected one of 1, 2, 4, 8, got 3" in result.output
    assert not (tmp_path / "other").exists()
