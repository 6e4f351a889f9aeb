"""Projection pre-weighting for FDK: cosine (Feldkamp), angular and Parker weights.

FDK for a flat detector (Feldkamp, Davis & Kress 1984; Kak & Slaney 3.6):

    f(p) = 1/2 * sum_i  gap_i * (SID * SDD / U_i(p)^2) * q_i(u_i(p), v_i(p))
    q_i  = ramp_u * (cos_gamma * p_i),   cos_gamma = SDD / sqrt(SDD^2 + u_r^2 + v_r^2)

``U = SID - z'`` is the voxel's distance to the source along the central ray,
``u_r, v_r`` the pixel's coordinates relative to the foot of the central ray
(``u + ProjectionOffsetX - SourceOffsetX``, ``v + ProjectionOffsetY - SourceOffsetY``)
and ``ramp_u`` the ramp filter on the real detector's u (``ramp.py``).  The
factor ``1/2`` is because a full orbit measures every line twice.

This module folds everything except ``(SID / U)^2`` into the projections:
``weight = cos_gamma * gap_i * SDD / (2 SID) * parker``, and the backprojector
applies ``(SID / U)^2`` (1 at the isocentre) -- the same split as RTK's
FDKWeightProjectionFilter / FDKBackProjectionImageFilter, so volumes agree
in scale with rtkfdk.

Angular weights ``gap_i`` are half the angular distance between the sorted
neighbours on the circle (RTK's ``GetAngularGaps``), which handles unevenly
spaced angles.

Short scans (Parker 1982): the scan is short when the largest gap between
consecutive angles on the circle exceeds ``short_scan_gap_deg`` (20 degrees,
rtkfdk's ``--short`` default).  With ``beta`` = angle - first angle,
``delta = (range - pi) / 2`` (range = last - first; Parker's minimum is
``pi + 2 * half fan angle``, larger ranges use the same formula) and
``alpha = -atan(u_r / SDD)`` the ray's fan angle, the conjugate of ray
``(beta, alpha)`` is ``(beta + pi + 2 alpha, -alpha)`` in this geometry, and
Parker's weights (which sum to 1 over conjugate rays) are

    sin^2(pi/4 * beta / (delta - alpha))                 0 <= beta <= 2 delta - 2 alpha
    1                                                     ... <= beta <= pi - 2 alpha
    sin^2(pi/4 * (pi + 2 delta - beta) / (delta + alpha)) ... <= beta <= pi + 2 delta

They are multiplied by 2 to cancel the full-scan ``1/2``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..geometry import ConeBeamGeometry

__all__ = ["ShortScan", "angular_gaps", "detect_short_scan", "cosine_weights", "parker_weights", "projection_weights"]

DEFAULT_SHORT_SCAN_GAP_DEG = 20.0


def angular_gaps(angles_rad: np.ndarray) -> np.ndarray:
    """Half the angular distance between each projection's neighbours on the circle, ``(n,)``.

    Angles are taken modulo 2 pi; a single projection gets 2 pi.
    """
    angles = np.mod(np.asarray(angles_rad, dtype=np.float64), 2 * math.pi)
    n = angles.size
    if n == 1:
        return np.array([2 * math.pi])
    order = np.argsort(angles, kind="stable")
    s = angles[order]
    prev = np.roll(s, 1)
    prev[0] -= 2 * math.pi
    nxt = np.roll(s, -1)
    nxt[-1] += 2 * math.pi
    gaps = np.empty(n)
    gaps[order] = 0.5 * (nxt - prev)
    return gaps


@dataclass(frozen=True)
class ShortScan:
    """A detected short scan: its first angle (radians, in [0, 2 pi)) and angular range."""

    first_angle_rad: float
    range_rad: float

    @property
    def delta_rad(self) -> float:
        """Parker's delta: half of the range beyond pi."""
        return 0.5 * (self.range_rad - math.pi)


def detect_short_scan(angles_rad: np.ndarray, gap_threshold_deg: float = DEFAULT_SHORT_SCAN_GAP_DEG) -> ShortScan | None:
    """``ShortScan`` if the largest gap between neighbouring angles exceeds the threshold, else ``None``."""
    angles = np.unique(np.mod(np.asarray(angles_rad, dtype=np.float64), 2 * math.pi))
    if angles.size < 2:
        return None
    gaps_next = np.diff(np.append(angles, angles[0] + 2 * math.pi))
    k = int(np.argmax(gaps_next))
    if gaps_next[k] < math.radians(gap_threshold_deg):
        return None
    first = angles[(k + 1) % angles.size]  # the scan starts after the missing arc
    last = angles[k]
    return ShortScan(float(first), float(np.mod(last - first, 2 * math.pi)))


def cosine_weights(geometry: ConeBeamGeometry, indices: slice | np.ndarray = slice(None)) -> np.ndarray:
    """``SDD / sqrt(SDD^2 + u_r^2 + v_r^2)`` for each pixel, shape ``(c, nv, nu)`` float64."""
    sdd = geometry.source_to_detector_mm[indices][:, None, None]
    u_r = geometry.u_mm()[None, None, :] + (geometry.projection_offset_x_mm - geometry.source_offset_x_mm)[indices][:, None, None]
    v_r = geometry.v_mm()[None, :, None] + (geometry.projection_offset_y_mm - geometry.source_offset_y_mm)[indices][:, None, None]
    return sdd / np.sqrt(sdd * sdd + u_r * u_r + v_r * v_r)


def parker_weights(
    geometry: ConeBeamGeometry, scan: ShortScan, indices: slice | np.ndarray = slice(None)
) -> np.ndarray:
    """Parker's weights (in [0, 1]) per detector column, shape ``(c, 1, nu)`` float64."""
    beta = np.mod(geometry.angles_rad[indices] - scan.first_angle_rad, 2 * math.pi)[:, None, None]
    # Angles within rounding of the first angle but just below it would wrap to ~2 pi.
    beta = np.where(beta > scan.range_rad + 1e-9, beta - 2 * math.pi, beta)
    u_r = geometry.u_mm()[None, None, :] + (geometry.projection_offset_x_mm - geometry.source_offset_x_mm)[indices][:, None, None]
    alpha = -np.arctan(u_r / geometry.source_to_detector_mm[indices][:, None, None])
    delta = scan.delta_rad
    weights = np.ones(np.broadcast_shapes(beta.shape, alpha.shape))
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = beta < 2 * delta - 2 * alpha
        falling = beta > math.pi - 2 * alpha
        w_rise = np.sin(0.25 * math.pi * beta / (delta - alpha)) ** 2
        w_fall = np.sin(0.25 * math.pi * (math.pi + 2 * delta - beta) / (delta + alpha)) ** 2
    weights = np.where(rising, w_rise, weights)
    weights = np.where(falling, w_fall, weights)
    weights = np.where((beta < 0) | (beta > math.pi + 2 * delta), 0.0, weights)
    return np.nan_to_num(weights, nan=0.0)


def projection_weights(
    geometry: ConeBeamGeometry,
    indices: slice | np.ndarray,
    *,
    gaps: np.ndarray,
    short_scan: ShortScan | None,
) -> np.ndarray:
    """All FDK pre-weights of projections ``indices``, shape ``(c, nv, nu)`` float64.

    ``gaps`` is ``angular_gaps`` of the *whole* acquisition (neighbours matter).
    """
    sid = geometry.source_to_isocenter_mm[indices]
    sdd = geometry.source_to_detector_mm[indices]
    factor = (gaps[indices] * sdd / (2.0 * sid))[:, None, None]
    weights = cosine_weights(geometry, indices) * factor
    if short_scan is not None:
        weights = weights * (2.0 * parker_weights(geometry, short_scan, indices))
    return weights


def check_short_scan(geometry: ConeBeamGeometry, scan: ShortScan) -> None:
    """Warn when the short scan does not cover pi + the full fan angle."""
    needed = math.pi + 2 * geometry.half_fan_angle_rad()
    if scan.range_rad + 1e-9 < needed:
        warnings.warn(
            f"short scan of {math.degrees(scan.range_rad):.2f} degrees is below pi + fan angle "
            f"({math.degrees(needed):.2f} degrees): Parker weighting cannot be exact",
            RuntimeWarning,
            stacklevel=3,
        )
