"""Analytic ellipsoid projections and voxelised phantoms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reconstruct.geometry import ConeBeamGeometry, VolumeGrid
from reconstruct.phantom import Ellipsoid, project_ellipsoids, shepp_logan_3d, sphere, voxelize_ellipsoids


def geometry(n=12, size=(33, 29), spacing=(1.5, 1.25), **offsets):
    return ConeBeamGeometry.circular(
        n,
        source_to_isocenter_mm=300.0,
        source_to_detector_mm=450.0,
        detector_size_uv=size,
        detector_spacing_uv_mm=spacing,
        **offsets,
    )


@pytest.mark.parametrize("center", [(0.0, 0.0, 0.0), (4.0, -3.0, 6.5)])
def test_sphere_chords_match_closed_form(center):
    g = geometry(projection_offset_x_mm=2.0, projection_offset_y_mm=-1.5, source_offset_y_mm=0.75)
    radius, density = 9.0, 0.5
    p = project_ellipsoids([sphere(radius, center, density)], g)
    # Closed form: a line at distance d from the centre cuts a chord 2 sqrt(r^2 - d^2).
    src = g.source_positions_mm()[:, None, None, :]
    direction = g.detector_points_mm() - src
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    d = np.linalg.norm(np.cross(np.asarray(center) - src, direction), axis=-1)
    expected = density * 2.0 * np.sqrt(np.clip(radius**2 - d**2, 0.0, None))
    assert p.shape == g.projection_shape and p.dtype == np.float32
    np.testing.assert_allclose(p, expected, atol=2e-5)
    assert p.max() == pytest.approx(2 * radius * density, rel=0.02)


def test_ellipsoid_axes_and_rotation():
    # Odd detector: the central pixel's ray goes through the isocentre along z' .
    g = ConeBeamGeometry(
        angles_rad=np.radians([0.0, 90.0]),
        source_to_isocenter_mm=300.0,
        source_to_detector_mm=450.0,
        detector_size_uv=(5, 5),
        detector_spacing_uv_mm=1.0,
    )
    center = (slice(None), 2, 2)
    flat = Ellipsoid((0, 0, 0), (10.0, 4.0, 3.0), 0.0, 1.0)
    np.testing.assert_allclose(project_ellipsoids([flat], g)[center], [6.0, 20.0], rtol=1e-6)  # along z, then x
    turned = Ellipsoid((0, 0, 0), (10.0, 4.0, 3.0), 90.0, 1.0)  # rotation about y swaps x and z
    np.testing.assert_allclose(project_ellipsoids([turned], g)[center], [20.0, 6.0], rtol=1e-6)


def test_chunking_does_not_change_results():
    g = geometry(n=7)
    phantom = shepp_logan_3d(20.0)
    a = project_ellipsoids(phantom, g)
    b = project_ellipsoids(phantom, g, memory_budget_mb=0.01)  # one projection per chunk
    np.testing.assert_array_equal(a, b)


def test_shepp_logan_layout():
    kak = shepp_logan_3d(100.0, variant="kak-slaney")
    assert len(kak) == 10
    assert kak[0].semi_axes_xyz_mm == pytest.approx((69.0, 90.0, 92.0))
    assert [e.density_per_mm for e in kak[:2]] == [2.0, -0.98]
    modified = shepp_logan_3d(100.0, density_scale=0.02)
    assert modified[0].density_per_mm == pytest.approx(0.02)
    with pytest.raises(ValueError, match="variant: expected"):
        shepp_logan_3d(10.0, variant="original")
    with pytest.raises(ValueError, match="semi_axes_xyz_mm: expected 3 positive"):
        Ellipsoid((0, 0, 0), (1.0, 0.0, 1.0))


@pytest.mark.parametrize("supersampling, tolerance", [(1, 0.03), (3, 0.005)])
def test_voxelised_sphere_volume(supersampling, tolerance):
    grid = VolumeGrid((21, 19, 23), 1.0)
    radius = 7.3
    vol = voxelize_ellipsoids([sphere(radius, (0.4, -0.3, 0.2))], grid, supersampling=supersampling)
    assert vol.shape == (23, 19, 21) and vol.dtype == np.float32
    assert vol.sum() == pytest.approx(4.0 / 3.0 * math.pi * radius**3, rel=tolerance)
    # Voxel [k, j, i] is at (x_i, y_j, z_k): an off-axis sphere lands where expected.
    shifted = voxelize_ellipsoids([sphere(2.0, (5.0, 0.0, -4.0))], grid)
    total = shifted.sum()
    centroid = [
        (shifted.sum(axis=(0, 1)) * grid.axis_mm("x")).sum() / total,
        (shifted.sum(axis=(0, 2)) * grid.axis_mm("y")).sum() / total,
        (shifted.sum(axis=(1, 2)) * grid.axis_mm("z")).sum() / total,
    ]
    np.testing.assert_allclose(centroid, [5.0, 0.0, -4.0], atol=1e-9)
