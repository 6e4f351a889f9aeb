"""Ellipsoid phantoms: exact cone-beam line integrals and voxelised references.

Frame and arrays follow ``reconstruct.geometry`` (RTK's fixed frame, rotation
axis y; projections ``[angle, v, u]``, volumes ``[z, y, x]``).  An ellipsoid is
rotated about the **rotation axis y**: its first semi-axis points along
``(cos a, 0, sin a)``, its second along y, its third along ``(-sin a, 0, cos a)``.

The 3D Shepp-Logan phantom is Kak & Slaney's (``Principles of Computerized
Tomographic Imaging``, 3D version of Shepp & Logan's head) laid out as RTK's
``SheppLoganPhantom`` does: the phantom's head-foot axis (Kak-Slaney z) is the
rotation axis y, and Kak-Slaney's in-slice rotations (about their z) become
rotations about y.  Coordinates are scaled by ``radius_mm`` (the unit phantom
spans |coordinate| <= 0.92).  ``variant="kak-slaney"`` keeps the original
densities (skull 2.0, brain 1.02 ...); ``variant="modified"`` uses Toft's
higher-contrast densities (1, -0.8, -0.2, -0.2, 0.1 ...) for the same shapes.
Densities are attenuation coefficients in 1/mm, times ``density_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .geometry import ConeBeamGeometry, VolumeGrid

__all__ = [
    "Ellipsoid",
    "shepp_logan_3d",
    "sphere",
    "project_ellipsoids",
    "voxelize_ellipsoids",
]


@dataclass(frozen=True)
class Ellipsoid:
    """A uniform ellipsoid.

    Attributes:
        center_xyz_mm: centre (x, y, z) in mm.
        semi_axes_xyz_mm: semi-axes (along x, y, z before rotation), mm, > 0.
        rotation_deg: rotation about the y (rotation) axis, degrees.
        density_per_mm: added attenuation (1/mm); overlapping ellipsoids add up.
    """

    center_xyz_mm: tuple[float, float, float]
    semi_axes_xyz_mm: tuple[float, float, float]
    rotation_deg: float = 0.0
    density_per_mm: float = 1.0

    def __post_init__(self) -> None:
        center = tuple(float(c) for c in self.center_xyz_mm)
        axes = tuple(float(a) for a in self.semi_axes_xyz_mm)
        if len(center) != 3 or not all(math.isfinite(c) for c in center):
            raise ValueError(f"center_xyz_mm: expected 3 finite numbers, got {self.center_xyz_mm!r}")
        if len(axes) != 3 or not all(math.isfinite(a) and a > 0 for a in axes):
            raise ValueError(f"semi_axes_xyz_mm: expected 3 positive numbers, got {self.semi_axes_xyz_mm!r}")
        if not math.isfinite(float(self.rotation_deg)) or not math.isfinite(float(self.density_per_mm)):
            raise ValueError(
                f"rotation_deg/density_per_mm: expected finite numbers, got {self.rotation_deg!r}/{self.density_per_mm!r}"
            )
        object.__setattr__(self, "center_xyz_mm", center)
        object.__setattr__(self, "semi_axes_xyz_mm", axes)

    def world_to_unit(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A, c)`` such that ``A @ (p - c)`` maps the ellipsoid to the unit ball."""
        a = math.radians(self.rotation_deg)
        # Rows are the ellipsoid's axes in the fixed frame (orthonormal), scaled by 1/semi-axis.
        axes = np.array([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]])
        return axes / np.asarray(self.semi_axes_xyz_mm)[:, None], np.asarray(self.center_xyz_mm)


# Kak & Slaney 3D Shepp-Logan, in RTK's layout: semi-axes (x, y, z), centre (x, y, z),
# rotation about y in degrees; y is Kak-Slaney's z (head-foot), z is their y.
_SHEPP_LOGAN_SHAPES: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...] = (
    ((0.69, 0.90, 0.92), (0.0, 0.0, 0.0), 0.0),
    ((0.6624, 0.880, 0.874), (0.0, 0.0, 0.0), 0.0),
    ((0.41, 0.21, 0.16), (-0.22, -0.25, 0.0), 108.0),
    ((0.31, 0.22, 0.11), (0.22, -0.25, 0.0), 72.0),
    ((0.21, 0.50, 0.25), (0.0, -0.25, 0.35), 0.0),
    ((0.046, 0.046, 0.046), (0.0, -0.25, 0.10), 0.0),
    ((0.046, 0.02, 0.023), (-0.08, -0.25, -0.65), 0.0),
    ((0.046, 0.02, 0.023), (0.06, -0.25, -0.65), 90.0),
    ((0.056, 0.1, 0.04), (0.06, 0.625, -0.105), 90.0),
    ((0.056, 0.1, 0.056), (0.0, 0.625, 0.1), 0.0),
)
_SHEPP_LOGAN_DENSITIES = {
    "kak-slaney": (2.0, -0.98, -0.02, -0.02, 0.02, 0.02, 0.01, 0.01, 0.02, -0.02),
    "modified": (1.0, -0.8, -0.2, -0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1),
}


def shepp_logan_3d(radius_mm: float, *, variant: str = "modified", density_scale: float = 1.0) -> list[Ellipsoid]:
    """The 3D Shepp-Logan head, unit coordinates scaled by ``radius_mm``."""
    if variant not in _SHEPP_LOGAN_DENSITIES:
        raise ValueError(f"variant: expected one of {sorted(_SHEPP_LOGAN_DENSITIES)}, got {variant!r}")
    if not (math.isfinite(radius_mm) and radius_mm > 0):
        raise ValueError(f"radius_mm: expected a positive number, got {radius_mm!r}")
    return [
        Ellipsoid(
            tuple(radius_mm * c for c in center),  # type: ignore[arg-type]
            tuple(radius_mm * a for a in axes),  # type: ignore[arg-type]
            angle,
            density * density_scale,
        )
        for (axes, center, angle), density in zip(_SHEPP_LOGAN_SHAPES, _SHEPP_LOGAN_DENSITIES[variant])
    ]


def sphere(radius_mm: float, center_xyz_mm: Sequence[float] = (0.0, 0.0, 0.0), density_per_mm: float = 1.0) -> Ellipsoid:
    return Ellipsoid(tuple(center_xyz_mm), (radius_mm,) * 3, 0.0, density_per_mm)  # type: ignore[arg-type]


def _chunk_size(per_item_bytes: int, budget_bytes: int) -> int:
    return max(1, budget_bytes // max(1, per_item_bytes))


def project_ellipsoids(
    ellipsoids: Iterable[Ellipsoid],
    geometry: ConeBeamGeometry,
    *,
    memory_budget_mb: float = 128.0,
) -> np.ndarray:
    """Exact line integrals through the phantom, shape ``(n, nv, nu)`` float32.

    Each pixel's ray runs from the source to the pixel centre; its chord
    through every ellipsoid is solved in closed form (ray-quadric
    intersection, clipped to the source-detector segment) in float64,
    vectorised over all pixels of a chunk of projections.
    """
    shapes = list(ellipsoids)
    n, nv, nu = geometry.projection_shape
    out = np.zeros((n, nv, nu), dtype=np.float32)
    sources = geometry.source_positions_mm()
    # ~10 float64 temporaries of (chunk, nv, nu, 3) live at once.
    chunk = _chunk_size(nv * nu * 3 * 8 * 10, int(memory_budget_mb * 2**20))
    for start in range(0, n, chunk):
        idx = slice(start, min(n, start + chunk))
        src = sources[idx][:, None, None, :]  # (c, 1, 1, 3)
        direction = geometry.detector_points_mm(idx) - src  # (c, nv, nu, 3), source -> pixel
        length = np.linalg.norm(direction, axis=-1)
        total = np.zeros(direction.shape[:-1])
        for shape in shapes:
            transform, center = shape.world_to_unit()
            q = (src - center) @ transform.T  # source in unit-ball coordinates
            e = direction @ transform.T
            a = np.einsum("...i,...i->...", e, e)
            b = np.einsum("...i,...i->...", q, e)  # half of the usual b
            c = np.einsum("...i,...i->...", q, q) - 1.0
            disc = b * b - a * c
            hit = disc > 0
            root = np.sqrt(np.where(hit, disc, 0.0))
            t_in = np.clip((-b - root) / a, 0.0, 1.0)
            t_out = np.clip((-b + root) / a, 0.0, 1.0)
            total += shape.density_per_mm * np.where(hit, t_out - t_in, 0.0) * length
        out[idx] = total
    return out


def voxelize_ellipsoids(
    ellipsoids: Iterable[Ellipsoid],
    grid: VolumeGrid,
    *,
    supersampling: int = 1,
    memory_budget_mb: float = 128.0,
) -> np.ndarray:
    """Reference volume ``[z, y, x]`` float32: density at voxel centres.

    With ``supersampling = s`` each voxel averages ``s**3`` evenly spread
    points (cell-centred sub-grid), approximating the partial-volume mean.
    """
    shapes = list(ellipsoids)
    if int(supersampling) != supersampling or supersampling < 1:
        raise ValueError(f"supersampling: expected a positive integer, got {supersampling!r}")
    s = int(supersampling)
    nz, ny, nx = grid.shape
    sub = (np.arange(s) + 0.5) / s - 0.5  # offsets in voxel units
    dx, dy, dz = grid.spacing_xyz_mm
    xs = (grid.axis_mm("x")[:, None] + dx * sub[None, :]).ravel()  # (nx*s,)
    ys = (grid.axis_mm("y")[:, None] + dy * sub[None, :]).ravel()
    zs = grid.axis_mm("z")
    out = np.empty((nz, ny, nx), dtype=np.float32)
    slab = _chunk_size(ny * s * nx * s * s * 8 * 6, int(memory_budget_mb * 2**20))
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        z = (zs[k0:k1, None] + dz * sub[None, :]).ravel()  # (kz*s,)
        total = np.zeros((z.size, ys.size, xs.size))
        for shape in shapes:
            transform, center = shape.world_to_unit()
            # Separable: the quadratic form splits over axis contributions.
            px, py, pz = xs - center[0], ys - center[1], z - center[2]
            r2 = np.zeros_like(total)
            for row in transform:
                r = row[0] * px[None, None, :] + row[1] * py[None, :, None] + row[2] * pz[:, None, None]
                r2 += r * r
            total += shape.density_per_mm * (r2 <= 1.0)
        out[k0:k1] = total.reshape(k1 - k0, s, ny, s, nx, s).mean(axis=(1, 3, 5))
    return out
