"""run_fdk: .npy projections + RTK XML or JSON geometry -> .npy volume."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from reconstruct.cli import run_fdk  # noqa: E402
from reconstruct.fdk import fdk  # noqa: E402
from reconstruct.geometry import ConeBeamGeometry, VolumeGrid, write_geometry_json, write_rtk_geometry_xml  # noqa: E402
from reconstruct.phantom import project_ellipsoids, sphere  # noqa: E402


@pytest.fixture(scope="module")
def acquisition():
    g = ConeBeamGeometry.circular(
        60, source_to_isocenter_mm=400.0, source_to_detector_mm=600.0, detector_size_uv=(40, 36),
        detector_spacing_uv_mm=(2.0, 2.5), projection_offset_x_mm=1.5,
    )
    return g, project_ellipsoids([sphere(15.0, (2.0, 1.0, -3.0), 0.02)], g)


def test_run_fdk_with_rtk_xml(tmp_path, acquisition):
    g, p = acquisition
    np.save(tmp_path / "proj.npy", p)
    write_rtk_geometry_xml(g, tmp_path / "geometry.xml")
    seen = []
    grid = run_fdk(
        tmp_path / "proj.npy", tmp_path / "geometry.xml", tmp_path / "volume",
        dimension=(20, 18, 22), spacing=2.0, detector_spacing=(2.0, 2.5), progress=lambda d, t: seen.append(d),
    )
    volume = np.load(tmp_path / "volume")  # written exactly where asked, no .npy appended
    assert grid == VolumeGrid((20, 18, 22), 2.0) and volume.shape == (22, 18, 20) and volume.dtype == np.float32
    np.testing.assert_allclose(volume, fdk(p, g, grid), atol=1e-6)
    assert seen[-1] == 60
    assert volume[9:13, 8:11, 9:12].mean() == pytest.approx(0.02, rel=0.01)


def test_run_fdk_with_json_and_origin(tmp_path, acquisition):
    g, p = acquisition
    np.save(tmp_path / "proj.npy", p.astype(np.float64))
    write_geometry_json(g, tmp_path / "geometry.json")
    grid = run_fdk(
        tmp_path / "proj.npy", tmp_path / "geometry.json", tmp_path / "volume.npy",
        dimension=8, spacing=(2.0, 2.0, 2.0), origin=(-5.0, -6.0, -7.0), filter="hann", device="cpu",
    )
    assert grid.origin_xyz_mm == (-5.0, -6.0, -7.0)
    np.testing.assert_allclose(np.load(tmp_path / "volume.npy"), fdk(p, g, grid, filter="hann"), atol=1e-6)


def test_run_fdk_errors(tmp_path, acquisition):
    g, p = acquisition
    np.save(tmp_path / "proj.npy", p)
    write_rtk_geometry_xml(g, tmp_path / "geometry.xml")
    with pytest.raises(ValueError, match="detector_spacing: expected the detector pixel size"):
        run_fdk(tmp_path / "proj.npy", tmp_path / "geometry.xml", tmp_path / "v.npy", dimension=8, spacing=2.0)
    np.save(tmp_path / "short.npy", p[:59])
    with pytest.raises(ValueError, match="expected 59 projections"):
        run_fdk(tmp_path / "short.npy", tmp_path / "geometry.xml", tmp_path / "v.npy", dimension=8, spacing=2.0,
                detector_spacing=(2.0, 2.5))
    np.save(tmp_path / "ints.npy", p.astype(np.int16))
    with pytest.raises(ValueError, match="floating-point"):
        run_fdk(tmp_path / "ints.npy", tmp_path / "geometry.xml", tmp_path / "v.npy", dimension=8, spacing=2.0,
                detector_spacing=(2.0, 2.5))
    with pytest.raises(ValueError, match="dimension_xyz: expected 1 or 3"):
        run_fdk(tmp_path / "proj.npy", tmp_path / "geometry.xml", tmp_path / "v.npy", dimension=(8, 8), spacing=2.0,
                detector_spacing=(2.0, 2.5))


def test_pacs_fdk_command(tmp_path, acquisition):
    from typer.testing import CliRunner

    from pacs.cli.main import app

    g, p = acquisition
    np.save(tmp_path / "proj.npy", p)
    write_rtk_geometry_xml(g, tmp_path / "geometry.xml")
    runner = CliRunner()
    result = runner.invoke(app, [
        "fdk", "--projections", str(tmp_path / "proj.npy"), "--geometry", str(tmp_path / "geometry.xml"),
        "--detector-spacing", "2,2.5", "--dimension", "20,18,22", "--spacing", "2", "--filter", "hann",
        "--out", str(tmp_path / "v.npy"),
    ])
    assert result.exit_code == 0, result.output
    volume = np.load(tmp_path / "v.npy")
    assert volume.shape == (22, 18, 20)
    np.testing.assert_allclose(volume, fdk(p, g, VolumeGrid((20, 18, 22), 2.0), filter="hann"), atol=1e-6)
    bad = runner.invoke(app, ["fdk", "--projections", str(tmp_path / "proj.npy"), "--geometry",
                              str(tmp_path / "geometry.xml"), "--out", str(tmp_path / "w.npy")])
    assert bad.exit_code == 1 and "detector_spacing" in bad.output
    worse = runner.invoke(app, ["fdk", "--projections", "p.npy", "--geometry", "g.xml", "--out", "o.npy",
                                "--dimension", "1,2"])
    assert worse.exit_code == 2 and "expected 1 or 3 values" in worse.output
