"""Circular cone-beam geometry in RTK's convention, and the reconstruction grid.

Coordinate system (RTK's ``ThreeDCircularProjectionGeometry``, IEC 61217 fixed
system; see ``docs/reconstruction.md`` for the sketch and the evidence):

* Fixed frame ``(x, y, z)`` in mm, isocentre at the origin. **The rotation axis
  is y.**  At gantry angle 0 the source is on +z, at ``(0, 0, SID)``, and the
  flat detector is normal to z, at ``z = SID - SDD``.
* Gantry angle ``theta`` rotates source and detector about y: the source sits
  at ``SID * (sin(theta), 0, cos(theta))`` (theta = 90 deg puts it on +x).
  Equivalently, a point ``p`` of the fixed frame has, in the rotated (detector)
  frame, the coordinates ``x' = cos(theta) x - sin(theta) z``, ``y' = y``,
  ``z' = sin(theta) x + cos(theta) z``.
* A point projects onto the detector at the physical coordinates
  ``u = sx + SDD * (x' - sx) / (SID - z') - ProjectionOffsetX`` and
  ``v = sy + SDD * (y' - sy) / (SID - z') - ProjectionOffsetY``
  (``sx, sy`` = SourceOffsetX/Y). ``u`` runs along x' and ``v`` along the
  rotation axis.  These are RTK's projection matrices (``matrices()``).
* Projection pixel ``[k, r, c]`` of an array ``[angle, v, u]`` lies at
  ``u = origin_u + c * spacing_u``, ``v = origin_v + r * spacing_v`` (the ITK
  origin/spacing of the projection stack).  The default detector origin centres
  the detector on the foot of the central ray: ``-(n - 1) / 2 * spacing``.
* Volume voxel ``[k, j, i]`` of an array ``[z, y, x]`` lies at
  ``(origin_x + i * spacing_x, origin_y + j * spacing_y, origin_z + k * spacing_z)``
  (ITK images read by numpy are ``[z, y, x]``).  So the rotation axis is the
  array's axis 1: a slice perpendicular to the rotation axis is ``volume[:, j, :]``.

Sizes, spacings and origins are given in ITK order (``_uv`` = (u, v),
``_xyz`` = (x, y, z)) like rtkfdk's options; the numpy shapes are the reverse.

RTK geometry XML (``<RTKThreeDCircularGeometry version="3">``) is read leniently
(case-insensitive tags, version 2 or 3, the old ``Angle`` tag, global values,
optional ``Matrix``) and written byte-for-byte the way RTK's writer does.
RTK's XML has no detector grid (it comes from the projection images), so the
reader takes it as arguments; the JSON form keeps everything.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ConeBeamGeometry",
    "VolumeGrid",
    "read_rtk_geometry_xml",
    "write_rtk_geometry_xml",
    "rtk_geometry_xml_text",
    "read_geometry_json",
    "write_geometry_json",
    "read_geometry",
]

# RTK converts with these exact expressions; using them keeps written degrees identical.
_RAD_TO_DEG = 45.0 / math.atan(1.0)
_DEG_TO_RAD = math.atan(1.0) / 45.0

JSON_FORMAT = "reconstruct.ConeBeamGeometry"
JSON_VERSION = 1

_PER_PROJECTION_FIELDS = (
    "source_to_isocenter_mm",
    "source_to_detector_mm",
    "projection_offset_x_mm",
    "projection_offset_y_mm",
    "source_offset_x_mm",
    "source_offset_y_mm",
)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _components(name: str, value: Any, *, kind: type, axes: str) -> tuple:
    """``len(axes)`` finite numbers, one per axis; a single number is used for all of them."""
    n = len(axes)
    labels = ", ".join(axes)
    try:
        arr = np.atleast_1d(np.asarray(value, dtype=float))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected 1 or {n} numbers ({labels}), got {_describe(value)}") from None
    if arr.ndim != 1 or arr.size not in (1, n):
        raise ValueError(f"{name}: expected 1 or {n} values ({labels}), got {_describe(value)}")
    values = [float(item) for item in arr] * (n if arr.size == 1 else 1)
    if not all(math.isfinite(item) for item in values):
        raise ValueError(f"{name}: expected finite values, got {_describe(value)}")
    if kind is int:
        if not all(item.is_integer() for item in values):
            raise ValueError(f"{name}: expected integers, got {_describe(value)}")
        return tuple(int(item) for item in values)
    return tuple(values)


def _pair(name: str, value: Any, *, kind: type) -> tuple:
    """Two finite numbers (u, v); a single number is used for both."""
    return _components(name, value, kind=kind, axes="uv")


def _triple(name: str, value: Any, *, kind: type) -> tuple:
    """Three numbers (x, y, z); a single number is used for all three."""
    return _components(name, value, kind=kind, axes="xyz")


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def _per_projection(name: str, value: Any, n: int) -> np.ndarray:
    """A float64 array of length ``n``; a scalar is broadcast to every projection."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number or {n} numbers, got {_describe(value)}") from None
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    elif arr.ndim != 1 or arr.size != n:
        raise ValueError(f"{name}: expected a number or {n} values (one per projection), got shape {arr.shape}")
    else:
        arr = arr.copy()
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got {_describe(arr[~np.isfinite(arr)][:4].tolist())}")
    return _readonly(arr)


@dataclass(frozen=True, eq=False)
class ConeBeamGeometry:
    """A circular cone-beam acquisition with a flat detector (RTK convention).

    Per-projection parameters accept a scalar (same for every projection) or a
    sequence of ``n_projections`` values; they are stored as read-only float64
    arrays of shape ``(n_projections,)``.

    Attributes:
        angles_rad: gantry angles (radians), any order, not necessarily evenly
            spaced.  Shape ``(n,)``.
        source_to_isocenter_mm: RTK SourceToIsocenterDistance (SID), > 0.
        source_to_detector_mm: RTK SourceToDetectorDistance (SDD), > 0
            (RTK's parallel geometry, SDD = 0, is not supported).
        detector_size_uv: detector columns and rows ``(nu, nv)``; the
            projection array is ``[n, nv, nu]``.
        detector_spacing_uv_mm: pixel pitch ``(du, dv)`` in mm.
        detector_origin_uv_mm: physical ``(u, v)`` of pixel ``[0, 0]``;
            ``None`` centres the detector on the central ray.
        projection_offset_x_mm / projection_offset_y_mm: RTK ProjectionOffsetX/Y.
        source_offset_x_mm / source_offset_y_mm: RTK SourceOffsetX/Y.
    """

    angles_rad: np.ndarray
    source_to_isocenter_mm: np.ndarray
    source_to_detector_mm: np.ndarray
    detector_size_uv: tuple[int, int]
    detector_spacing_uv_mm: tuple[float, float]
    detector_origin_uv_mm: tuple[float, float] | None = None
    projection_offset_x_mm: np.ndarray | float = 0.0
    projection_offset_y_mm: np.ndarray | float = 0.0
    source_offset_x_mm: np.ndarray | float = 0.0
    source_offset_y_mm: np.ndarray | float = 0.0

    def __post_init__(self) -> None:
        try:
            angles = np.array(self.angles_rad, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"angles_rad: expected a sequence of numbers, got {_describe(self.angles_rad)}") from None
        if angles.ndim != 1 or angles.size < 1:
            raise ValueError(f"angles_rad: expected a 1-D sequence of at least one angle, got shape {angles.shape}")
        if not np.all(np.isfinite(angles)):
            raise ValueError("angles_rad: expected finite values, got non-finite angles")
        object.__setattr__(self, "angles_rad", _readonly(angles))
        n = angles.size
        for name in _PER_PROJECTION_FIELDS:
            object.__setattr__(self, name, _per_projection(name, getattr(self, name), n))
        if np.any(self.source_to_isocenter_mm <= 0):
            raise ValueError(
                f"source_to_isocenter_mm: expected positive distances, got {self.source_to_isocenter_mm.min()}"
            )
        if np.any(self.source_to_detector_mm <= 0):
            raise ValueError(
                "source_to_detector_mm: expected positive distances (RTK's parallel geometry, SDD = 0, "
                f"is not supported), got {self.source_to_detector_mm.min()}"
            )
        size = _pair("detector_size_uv", self.detector_size_uv, kind=int)
        if min(size) < 2:
            raise ValueError(f"detector_size_uv: expected at least 2 columns and 2 rows, got {size}")
        object.__setattr__(self, "detector_size_uv", size)
        spacing = _pair("detector_spacing_uv_mm", self.detector_spacing_uv_mm, kind=float)
        if min(spacing) <= 0:
            raise ValueError(f"detector_spacing_uv_mm: expected positive spacings, got {spacing}")
        object.__setattr__(self, "detector_spacing_uv_mm", spacing)
        if self.detector_origin_uv_mm is None:
            origin = tuple(-0.5 * (s - 1) * d for s, d in zip(size, spacing))
        else:
            origin = _pair("detector_origin_uv_mm", self.detector_origin_uv_mm, kind=float)
        object.__setattr__(self, "detector_origin_uv_mm", origin)

    # ----------------------------------------------------------------- basics
    @property
    def n_projections(self) -> int:
        return int(self.angles_rad.size)

    @property
    def projection_shape(self) -> tuple[int, int, int]:
        """numpy shape ``(n_projections, nv, nu)`` of the projection stack."""
        nu, nv = self.detector_size_uv
        return (self.n_projections, nv, nu)

    def u_mm(self) -> np.ndarray:
        """Physical u of each detector column, shape ``(nu,)``."""
        return self.detector_origin_uv_mm[0] + self.detector_spacing_uv_mm[0] * np.arange(self.detector_size_uv[0])

    def v_mm(self) -> np.ndarray:
        """Physical v of each detector row, shape ``(nv,)``."""
        return self.detector_origin_uv_mm[1] + self.detector_spacing_uv_mm[1] * np.arange(self.detector_size_uv[1])

    def replace(self, **changes: Any) -> "ConeBeamGeometry":
        """A copy with some fields changed (validated again)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return ConeBeamGeometry(**values)

    def with_detector_rows(self, start: int, stop: int) -> "ConeBeamGeometry":
        """The geometry of ``projections[:, start:stop, :]`` (same rays, fewer rows)."""
        nv = self.detector_size_uv[1]
        if not (0 <= start < stop <= nv) or stop - start < 2:
            raise ValueError(f"rows: expected 0 <= start < stop <= {nv} with at least 2 rows, got {start}:{stop}")
        ou, ov = self.detector_origin_uv_mm
        return self.replace(
            detector_size_uv=(self.detector_size_uv[0], stop - start),
            detector_origin_uv_mm=(ou, ov + start * self.detector_spacing_uv_mm[1]),
        )

    def subset(self, indices: Sequence[int] | np.ndarray | slice) -> "ConeBeamGeometry":
        """The geometry of ``projections[indices]``."""
        changes: dict[str, Any] = {"angles_rad": self.angles_rad[indices]}
        for name in _PER_PROJECTION_FIELDS:
            changes[name] = getattr(self, name)[indices]
        return self.replace(**changes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConeBeamGeometry):
            return NotImplemented
        return (
            self.detector_size_uv == other.detector_size_uv
            and self.detector_spacing_uv_mm == other.detector_spacing_uv_mm
            and self.detector_origin_uv_mm == other.detector_origin_uv_mm
            and np.array_equal(self.angles_rad, other.angles_rad)
            and all(np.array_equal(getattr(self, f), getattr(other, f)) for f in _PER_PROJECTION_FIELDS)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking arrays: not hashable

    @classmethod
    def circular(
        cls,
        n_projections: int,
        *,
        source_to_isocenter_mm: float,
        source_to_detector_mm: float,
        detector_size_uv: int | tuple[int, int],
        detector_spacing_uv_mm: float | tuple[float, float],
        detector_origin_uv_mm: tuple[float, float] | None = None,
        first_angle_deg: float = 0.0,
        arc_deg: float = 360.0,
        **offsets: Any,
    ) -> "ConeBeamGeometry":
        """Evenly spaced gantry angles ``first + i * arc / n`` (as rtksimulatedgeometry)."""
        if int(n_projections) != n_projections or n_projections < 1:
            raise ValueError(f"n_projections: expected a positive integer, got {_describe(n_projections)}")
        angles_deg = first_angle_deg + arc_deg * np.arange(int(n_projections)) / int(n_projections)
        return cls(
            angles_rad=angles_deg * _DEG_TO_RAD,
            source_to_isocenter_mm=source_to_isocenter_mm,
            source_to_detector_mm=source_to_detector_mm,
            detector_size_uv=detector_size_uv,
            detector_spacing_uv_mm=detector_spacing_uv_mm,
            detector_origin_uv_mm=detector_origin_uv_mm,
            **offsets,
        )

    # ------------------------------------------------------------ geometry
    def rotation_matrices(self) -> np.ndarray:
        """Fixed-to-rotated rotations ``R`` (``p' = R p``), shape ``(n, 3, 3)``."""
        c, s = np.cos(self.angles_rad), np.sin(self.angles_rad)
        zero, one = np.zeros_like(c), np.ones_like(c)
        return np.stack(
            [np.stack([c, zero, -s], -1), np.stack([zero, one, zero], -1), np.stack([s, zero, c], -1)], -2
        )

    def source_positions_mm(self) -> np.ndarray:
        """Source positions in the fixed frame, shape ``(n, 3)`` as (x, y, z)."""
        local = np.stack([self.source_offset_x_mm, self.source_offset_y_mm, self.source_to_isocenter_mm], -1)
        return np.einsum("nji,nj->ni", self.rotation_matrices(), local)

    def detector_points_mm(self, indices: slice | np.ndarray | None = None) -> np.ndarray:
        """Fixed-frame positions of every pixel centre, shape ``(n, nv, nu, 3)``."""
        idx = slice(None) if indices is None else indices
        rot = self.rotation_matrices()[idx]
        px, py = self.projection_offset_x_mm[idx], self.projection_offset_y_mm[idx]
        depth = (self.source_to_isocenter_mm - self.source_to_detector_mm)[idx]
        u, v = self.u_mm(), self.v_mm()
        local_x = (u[None, None, :] + px[:, None, None]) * np.ones((1, v.size, 1))
        local_y = (v[None, :, None] + py[:, None, None]) * np.ones((1, 1, u.size))
        local_z = np.broadcast_to(depth[:, None, None], local_x.shape)
        local = np.stack([local_x, local_y, local_z], -1)
        return np.einsum("nji,nvuj->nvui", rot, local)

    def project_mm(self, points_xyz_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Detector coordinates ``(u, v)`` in mm of fixed-frame points.

        ``points_xyz_mm`` has shape ``(..., 3)``; results have shape ``(n, ...)``.
        """
        p = np.asarray(points_xyz_mm, dtype=np.float64)
        rot = self.rotation_matrices()
        rp = np.einsum("nij,...j->n...i", rot, p)
        extra = (slice(None),) + (None,) * (rp.ndim - 2)
        sid, sdd = self.source_to_isocenter_mm[extra], self.source_to_detector_mm[extra]
        sx, sy = self.source_offset_x_mm[extra], self.source_offset_y_mm[extra]
        mag = sdd / (sid - rp[..., 2])
        u = sx + mag * (rp[..., 0] - sx) - self.projection_offset_x_mm[extra]
        v = sy + mag * (rp[..., 1] - sy) - self.projection_offset_y_mm[extra]
        return u, v

    def half_fan_angle_rad(self) -> float:
        """Largest in-plane angle between a ray and the central ray (pixel edges included)."""
        du = self.detector_spacing_uv_mm[0]
        u = self.u_mm()
        edges = np.array([u[0] - 0.5 * du, u[-1] + 0.5 * du])
        u_r = edges[None, :] + (self.projection_offset_x_mm - self.source_offset_x_mm)[:, None]
        return float(np.max(np.abs(np.arctan(u_r / self.source_to_detector_mm[:, None]))))

    def matrices(self) -> np.ndarray:
        """RTK's 3x4 projection matrices (fixed-frame mm -> detector mm), shape ``(n, 3, 4)``.

        Built with the same factors and multiplication order as RTK
        (``ProjectionTranslation * Magnification * SourceTranslation * Rotation``)
        so that written XML matches RTK's digits.
        """
        return np.array([_rtk_matrix(self, i) for i in range(self.n_projections)])

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; constant per-projection values are stored once."""
        out: dict[str, Any] = {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "angles_rad": self.angles_rad.tolist(),
        }
        for name in _PER_PROJECTION_FIELDS:
            arr = getattr(self, name)
            out[name] = float(arr[0]) if np.all(arr == arr[0]) else arr.tolist()
        out["detector_size_uv"] = list(self.detector_size_uv)
        out["detector_spacing_uv_mm"] = list(self.detector_spacing_uv_mm)
        out["detector_origin_uv_mm"] = list(self.detector_origin_uv_mm)  # type: ignore[arg-type]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConeBeamGeometry":
        if not isinstance(data, dict):
            raise ValueError(f"geometry JSON: expected an object, got {type(data).__name__}")
        if data.get("format", JSON_FORMAT) != JSON_FORMAT:
            raise ValueError(f"geometry JSON: expected format {JSON_FORMAT!r}, got {data.get('format')!r}")
        if int(data.get("version", JSON_VERSION)) > JSON_VERSION:
            raise ValueError(f"geometry JSON: expected version <= {JSON_VERSION}, got {data.get('version')!r}")
        known = set(cls.__dataclass_fields__) | {"format", "version", "angles_deg"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"geometry JSON: expected only known keys, got unknown {unknown}")
        kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "angles_deg" in data:
            if "angles_rad" in data:
                raise ValueError("geometry JSON: expected angles_rad or angles_deg, got both")
            kwargs["angles_rad"] = np.asarray(data["angles_deg"], dtype=np.float64) * _DEG_TO_RAD
        missing = [k for k in ("angles_rad", "source_to_isocenter_mm", "source_to_detector_mm",
                               "detector_size_uv", "detector_spacing_uv_mm") if k not in kwargs]
        if missing:
            raise ValueError(f"geometry JSON: expected keys {missing}, got none")
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ConeBeamGeometry":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------
# Volume grid
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeGrid:
    """The reconstructed volume's voxel grid (ITK/rtkfdk style, identity direction).

    Attributes:
        dimension_xyz: number of voxels along (x, y, z); 1 value means all three.
        spacing_xyz_mm: voxel size along (x, y, z); 1 value means all three.
        origin_xyz_mm: centre of voxel ``[0, 0, 0]``; ``None`` centres the
            volume on the isocentre (``-(n - 1) / 2 * spacing``, rtkfdk's default).

    The numpy volume has shape ``shape == (nz, ny, nx)``.
    """

    dimension_xyz: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    origin_xyz_mm: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        dim = _triple("dimension_xyz", self.dimension_xyz, kind=int)
        if min(dim) < 1:
            raise ValueError(f"dimension_xyz: expected positive sizes, got {dim}")
        spacing = _triple("spacing_xyz_mm", self.spacing_xyz_mm, kind=float)
        if min(spacing) <= 0:
            raise ValueError(f"spacing_xyz_mm: expected positive spacings, got {spacing}")
        if self.origin_xyz_mm is None:
            origin = tuple(-0.5 * (n - 1) * s for n, s in zip(dim, spacing))
        else:
            origin = _triple("origin_xyz_mm", self.origin_xyz_mm, kind=float)
        object.__setattr__(self, "dimension_xyz", dim)
        object.__setattr__(self, "spacing_xyz_mm", spacing)
        object.__setattr__(self, "origin_xyz_mm", origin)

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy shape ``(nz, ny, nx)``."""
        nx, ny, nz = self.dimension_xyz
        return (nz, ny, nx)

    def axis_mm(self, axis: str) -> np.ndarray:
        """Voxel-centre coordinates along ``"x"``, ``"y"`` or ``"z"``."""
        i = "xyz".index(axis)
        return self.origin_xyz_mm[i] + self.spacing_xyz_mm[i] * np.arange(self.dimension_xyz[i])  # type: ignore[index]

    def y_slab(self, start: int, stop: int) -> "VolumeGrid":
        """The grid of ``volume[:, start:stop, :]`` (a slab along the rotation axis)."""
        ny = self.dimension_xyz[1]
        if not (0 <= start < stop <= ny):
            raise ValueError(f"y slab: expected 0 <= start < stop <= {ny}, got {start}:{stop}")
        ox, oy, oz = self.origin_xyz_mm  # type: ignore[misc]
        return VolumeGrid(
            (self.dimension_xyz[0], stop - start, self.dimension_xyz[2]),
            self.spacing_xyz_mm,
            (ox, oy + start * self.spacing_xyz_mm[1], oz),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dimension_xyz": list(self.dimension_xyz),
            "spacing_xyz_mm": list(self.spacing_xyz_mm),
            "origin_xyz_mm": list(self.origin_xyz_mm),  # type: ignore[arg-type]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VolumeGrid":
        return cls(data["dimension_xyz"], data["spacing_xyz_mm"], data.get("origin_xyz_mm"))


# ---------------------------------------------------------------------------
# RTK XML
# ---------------------------------------------------------------------------

# Tag (lower case) -> (our per-projection key, converts degrees?)
_XML_TAGS: dict[str, str] = {
    "sourcetoisocenterdistance": "sid",
    "sourcetodetectordistance": "sdd",
    "gantryangle": "gantry",
    "angle": "gantry",  # RTK reads the pre-v2 name too
    "projectionoffsetx": "px",
    "projectionoffsety": "py",
    "sourceoffsetx": "sx",
    "sourceoffsety": "sy",
    "inplaneangle": "inplane",
    "outofplaneangle": "outofplane",
}
_XML_IGNORED = {"collimationuinf", "collimationusup", "collimationvinf", "collimationvsup"}
_XML_DEFAULTS = {"sid": 0.0, "sdd": 0.0, "gantry": 0.0, "px": 0.0, "py": 0.0, "sx": 0.0, "sy": 0.0,
                 "inplane": 0.0, "outofplane": 0.0}


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def _xml_float(tag: str, text: str | None) -> float:
    try:
        value = float((text or "").strip())
    except ValueError:
        raise ValueError(f"RTK geometry XML <{tag}>: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"RTK geometry XML <{tag}>: expected a finite number, got {text!r}")
    return value


def _parse_rtk_xml(text: str) -> dict[str, np.ndarray]:
    """Per-projection parameters (degrees for angles) of an RTK geometry XML text.

    As RTK's reader does, a value set at the top level or inside a
    ``<Projection>`` stays in force for the following projections until set again.
    """
    # The DOCTYPE line RTK writes is harmless, but strip it so that no DTD
    # processing is ever attempted on untrusted files.
    cleaned = re.sub(r"<!DOCTYPE[^>]*>", "", text, flags=re.IGNORECASE)
    try:
        root = ET.fromstring(cleaned)
    except ET.ParseError as exc:
        raise ValueError(f"RTK geometry XML: expected well-formed XML, got a parse error ({exc})") from None
    if _local_name(root.tag) != "rtkthreedcirculargeometry":
        raise ValueError(f"RTK geometry XML: expected root <RTKThreeDCircularGeometry>, got <{root.tag}>")
    version = root.attrib.get("version")
    if version is not None and version.strip() not in ("2", "3"):
        raise ValueError(f"RTK geometry XML: expected version 2 or 3, got {version!r}")

    current = dict(_XML_DEFAULTS)
    rows: dict[str, list[float]] = {key: [] for key in _XML_DEFAULTS}
    matrices: list[np.ndarray | None] = []

    def read_value(elem: ET.Element) -> bool:
        name = _local_name(elem.tag)
        if name in _XML_TAGS:
            current[_XML_TAGS[name]] = _xml_float(elem.tag, elem.text)
            return True
        if name == "radiuscylindricaldetector":
            if _xml_float(elem.tag, elem.text) != 0.0:
                raise ValueError(
                    "RTK geometry XML: expected a flat detector (RadiusCylindricalDetector 0), "
                    f"got RadiusCylindricalDetector {elem.text.strip() if elem.text else ''}"
                )
            return True
        return name in _XML_IGNORED

    for child in root:
        name = _local_name(child.tag)
        if name == "projection":
            matrix: np.ndarray | None = None
            for elem in child:
                if _local_name(elem.tag) == "matrix":
                    try:
                        matrix = np.array([float(t) for t in (elem.text or "").split()], dtype=np.float64)
                    except ValueError:
                        raise ValueError(f"RTK geometry XML <Matrix>: expected 12 numbers, got {elem.text!r}") from None
                    if matrix.size != 12:
                        raise ValueError(f"RTK geometry XML <Matrix>: expected 12 numbers, got {matrix.size}")
                    matrix = matrix.reshape(3, 4)
                else:
                    read_value(elem)  # unknown per-projection tags are ignored (lenient)
            for key in rows:
                rows[key].append(current[key])
            matrices.append(matrix)
        else:
            read_value(child)
    if not matrices:
        raise ValueError("RTK geometry XML: expected at least one <Projection>, got none")
    out = {key: np.asarray(values, dtype=np.float64) for key, values in rows.items()}
    out["_matrices"] = matrices  # type: ignore[assignment]
    return out


def read_rtk_geometry_xml(
    path_or_text: str | Path,
    *,
    detector_size_uv: int | tuple[int, int],
    detector_spacing_uv_mm: float | tuple[float, float],
    detector_origin_uv_mm: tuple[float, float] | None = None,
    check_matrices: bool = True,
) -> ConeBeamGeometry:
    """Read an RTK ``ThreeDCircularProjectionGeometry`` XML file (or XML text).

    The detector grid is not in RTK's XML (RTK takes it from the projection
    images), hence the keyword arguments.  Non-zero InPlaneAngle or
    OutOfPlaneAngle, cylindrical detectors and parallel geometry (SDD 0) are
    rejected.  When a ``<Matrix>`` is present it is checked against the
    parameters with RTK's tolerance (0.001), which catches files written
    with another convention.
    """
    text = str(path_or_text)
    if not text.lstrip().startswith("<"):
        text = Path(path_or_text).read_text(encoding="utf-8")
    params = _parse_rtk_xml(text)
    for key, label in (("inplane", "InPlaneAngle"), ("outofplane", "OutOfPlaneAngle")):
        bad = params[key][params[key] % 360.0 != 0.0]
        if bad.size:
            raise ValueError(
                f"RTK geometry XML: expected {label} 0 (detector tilts are not supported), got {bad[0]!r} degrees"
            )
    geometry = ConeBeamGeometry(
        angles_rad=params["gantry"] * _DEG_TO_RAD,
        source_to_isocenter_mm=params["sid"],
        source_to_detector_mm=params["sdd"],
        detector_size_uv=detector_size_uv,
        detector_spacing_uv_mm=detector_spacing_uv_mm,
        detector_origin_uv_mm=detector_origin_uv_mm,
        projection_offset_x_mm=params["px"],
        projection_offset_y_mm=params["py"],
        source_offset_x_mm=params["sx"],
        source_offset_y_mm=params["sy"],
    )
    if check_matrices:
        for i, matrix in enumerate(params["_matrices"]):  # type: ignore[arg-type]
            if matrix is None:
                continue
            expected = np.array(_rtk_matrix(geometry, i))
            if np.max(np.abs(matrix - expected)) > 0.001:
                raise ValueError(
                    f"RTK geometry XML projection {i}: expected a <Matrix> consistent with the parameters "
                    f"(max difference <= 0.001), got a difference of {np.max(np.abs(matrix - expected)):.6g}"
                )
    return geometry


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """Plain float matrix product accumulated left to right, as vnl does."""
    out = []
    for i in range(len(a)):
        row = []
        for j in range(len(b[0])):
            acc = a[i][0] * b[0][j]
            for k in range(1, len(b)):
                acc += a[i][k] * b[k][j]
            row.append(acc)
        out.append(row)
    return out


def _rtk_matrix(geometry: ConeBeamGeometry, i: int) -> list[list[float]]:
    """RTK's projection matrix of projection ``i`` (same factors and order as RTK)."""
    sid = float(geometry.source_to_isocenter_mm[i])
    sdd = float(geometry.source_to_detector_mm[i])
    px, py = float(geometry.projection_offset_x_mm[i]), float(geometry.projection_offset_y_mm[i])
    sx, sy = float(geometry.source_offset_x_mm[i]), float(geometry.source_offset_y_mm[i])
    # Euler ZXY rotation with opposite angles (RTK rotates the volume, not the scanner);
    # in-plane and out-of-plane angles are always 0 here.
    ax, ay, az = -0.0, -float(geometry.angles_rad[i]), -0.0
    cx, snx, cy, sny, cz, snz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rot_x = [[1.0, 0.0, 0.0], [0.0, cx, -snx], [0.0, snx, cx]]
    rot_y = [[cy, 0.0, sny], [0.0, 1.0, 0.0], [-sny, 0.0, cy]]
    rot_z = [[cz, -snz, 0.0], [snz, cz, 0.0], [0.0, 0.0, 1.0]]
    r3 = _matmul(_matmul(rot_z, rot_x), rot_y)
    rotation = [r3[0] + [0.0], r3[1] + [0.0], r3[2] + [0.0], [0.0, 0.0, 0.0, 1.0]]
    proj_translation = [[1.0, 0.0, sx - px], [0.0, 1.0, sy - py], [0.0, 0.0, 1.0]]
    magnification = [[-sdd, 0.0, 0.0, 0.0], [0.0, -sdd, 0.0, 0.0], [0.0, 0.0, 1.0, -sid]]
    source_translation = [[1.0, 0.0, 0.0, -sx], [0.0, 1.0, 0.0, -sy], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    return _matmul(_matmul(_matmul(proj_translation, magnification), source_translation), rotation)


def _fmt(value: float) -> str:
    """C++ ``ostream`` with ``precision(15)`` and default float format (= ``%.15g``)."""
    return "%.15g" % value


def rtk_geometry_xml_text(geometry: ConeBeamGeometry) -> str:
    """The XML text RTK's ``ThreeDCircularProjectionGeometryXMLFileWriter`` writes.

    Gantry angles are written in degrees wrapped to [0, 360) as RTK stores
    them; a parameter equal for all projections is written once at the top
    (and not at all when it equals RTK's default 0).
    """
    ind = "  "
    lines = ['<?xml version="1.0"?>', "<!DOCTYPE RTKGEOMETRY>", '<RTKThreeDCircularGeometry version="3">']
    per_projection: list[tuple[str, np.ndarray]] = []
    for tag, arr in (
        ("SourceToIsocenterDistance", geometry.source_to_isocenter_mm),
        ("SourceToDetectorDistance", geometry.source_to_detector_mm),
        ("SourceOffsetX", geometry.source_offset_x_mm),
        ("SourceOffsetY", geometry.source_offset_y_mm),
        ("ProjectionOffsetX", geometry.projection_offset_x_mm),
        ("ProjectionOffsetY", geometry.projection_offset_y_mm),
    ):
        if np.all(arr == arr[0]):
            if arr[0] != 0.0:
                lines.append(f"{ind}{ind}<{tag}>{_fmt(float(arr[0]))}</{tag}>")
        else:
            per_projection.append((tag, arr))
    two_pi = 2 * math.pi
    for i in range(geometry.n_projections):
        angle = float(geometry.angles_rad[i])
        wrapped = angle - two_pi * math.floor(angle / two_pi)
        lines.append(f"{ind}<Projection>")
        lines.append(f"{ind}{ind}<GantryAngle>{_fmt(_RAD_TO_DEG * wrapped)}</GantryAngle>")
        for tag, arr in per_projection:
            lines.append(f"{ind}{ind}<{tag}>{_fmt(float(arr[i]))}</{tag}>")
        lines.append(f"{ind}{ind}<Matrix>")
        for row in _rtk_matrix(geometry, i):
            lines.append(ind * 3 + " ".join(f"{_fmt(value):>19}" for value in row))
        lines.append(f"{ind}{ind}</Matrix>")
        lines.append(f"{ind}</Projection>")
    lines.append("</RTKThreeDCircularGeometry>")
    return "\n".join(lines) + "\n"


def write_rtk_geometry_xml(geometry: ConeBeamGeometry, path: str | Path) -> None:
    """Write RTK's geometry XML (the detector grid is not part of it)."""
    Path(path).write_text(rtk_geometry_xml_text(geometry), encoding="utf-8")


def write_geometry_json(geometry: ConeBeamGeometry, path: str | Path) -> None:
    Path(path).write_text(geometry.to_json(), encoding="utf-8")


def read_geometry_json(path: str | Path) -> ConeBeamGeometry:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"geometry JSON {path}: expected valid JSON, got {exc}") from None
    return ConeBeamGeometry.from_dict(data)


def read_geometry(
    path: str | Path,
    *,
    detector_size_uv: int | tuple[int, int] | None = None,
    detector_spacing_uv_mm: float | tuple[float, float] | None = None,
    detector_origin_uv_mm: tuple[float, float] | None = None,
) -> ConeBeamGeometry:
    """Read an RTK XML (``.xml``) or JSON geometry; detector arguments override the file.

    For XML, ``detector_size_uv`` and ``detector_spacing_uv_mm`` are required.
    """
    path = Path(path)
    head = path.read_text(encoding="utf-8").lstrip()[:1]
    if head == "<":
        if detector_size_uv is None or detector_spacing_uv_mm is None:
            raise ValueError(
                f"{path}: an RTK XML geometry has no detector grid: expected detector size and spacing, got none"
            )
        return read_rtk_geometry_xml(
            path,
            detector_size_uv=detector_size_uv,
            detector_spacing_uv_mm=detector_spacing_uv_mm,
            detector_origin_uv_mm=detector_origin_uv_mm,
        )
    geometry = read_geometry_json(path)
    changes: dict[str, Any] = {}
    if detector_size_uv is not None:
        changes["detector_size_uv"] = detector_size_uv
    if detector_spacing_uv_mm is not None:
        changes["detector_spacing_uv_mm"] = detector_spacing_uv_mm
    if changes or detector_origin_uv_mm is not None:
        # A new size or spacing without an explicit origin re-centres the detector.
        changes["detector_origin_uv_mm"] = detector_origin_uv_mm
    return geometry.replace(**changes) if changes else geometry
