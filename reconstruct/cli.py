"""File-level entry point: ``.npy`` projections + RTK XML / JSON geometry -> ``.npy`` volume.

Options mirror rtkfdk's: ``dimension`` and ``spacing`` take 1 or 3 values in
ITK order (x, y, z); ``origin`` defaults to a volume centred on the
isocentre; the detector spacing/origin take 1 or 2 values in (u, v) order
(RTK reads them from the projection images, which a ``.npy`` does not carry).
Arrays: projections ``[angle, v, u]``, volume ``[z, y, x]`` (see
``docs/reconstruction.md``).  No DICOM, no HTTP: the caller wires it up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .geometry import ConeBeamGeometry, VolumeGrid, read_geometry

__all__ = ["run_fdk", "load_geometry_for_projections"]

Number = float | int


def load_geometry_for_projections(
    geometry_path: str | Path,
    projection_shape: tuple[int, ...],
    *,
    detector_spacing: Number | Sequence[Number] | None = None,
    detector_origin: Number | Sequence[Number] | None = None,
) -> ConeBeamGeometry:
    """Read a geometry and check it against a projection stack ``[angle, v, u]``.

    With RTK XML, ``detector_spacing`` is required (it is not in the file);
    with JSON, the detector arguments override the file's values.
    """
    if len(projection_shape) != 3:
        raise ValueError(f"projections: expected a 3-D array [angle, v, u], got shape {tuple(projection_shape)}")
    n, nv, nu = (int(s) for s in projection_shape)
    path = Path(geometry_path)
    is_xml = path.read_text(encoding="utf-8").lstrip().startswith("<")
    if is_xml and detector_spacing is None:
        raise ValueError(
            f"detector_spacing: expected the detector pixel size in mm (1 or 2 values u, v) because "
            f"the RTK XML geometry {path.name} has none, got None"
        )
    geometry = read_geometry(
        path,
        detector_size_uv=(nu, nv),
        detector_spacing_uv_mm=detector_spacing,  # type: ignore[arg-type]
        detector_origin_uv_mm=detector_origin,  # type: ignore[arg-type]
    )
    if geometry.n_projections != n:
        raise ValueError(
            f"geometry: expected {n} projections to match the projection array, got {geometry.n_projections}"
        )
    return geometry


def run_fdk(
    projections_path: str | Path,
    geometry_path: str | Path,
    out_path: str | Path,
    *,
    dimension: Number | Sequence[Number],
    spacing: Number | Sequence[Number],
    origin: Number | Sequence[Number] | None = None,
    detector_spacing: Number | Sequence[Number] | None = None,
    detector_origin: Number | Sequence[Number] | None = None,
    filter: str = "ram-lak",
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> VolumeGrid:
    """Reconstruct ``projections_path`` (.npy ``[angle, v, u]`` float line integrals) with FDK.

    Writes a float32 ``.npy`` volume ``[z, y, x]`` to ``out_path`` and returns
    its ``VolumeGrid`` (origin and spacing are not stored in a ``.npy``).
    The projections are memory-mapped: only a chunk at a time is in memory.
    """
    from .fdk import fdk  # torch is only needed here

    projections = np.load(Path(projections_path), mmap_mode="r")
    if projections.dtype.kind != "f":
        raise ValueError(f"projections: expected floating-point line integrals, got dtype {projections.dtype}")
    geometry = load_geometry_for_projections(
        geometry_path, projections.shape, detector_spacing=detector_spacing, detector_origin=detector_origin
    )
    grid = VolumeGrid(dimension, spacing, origin)  # type: ignore[arg-type]
    volume = fdk(projections, geometry, grid, filter=filter, device=device, progress=progress)
    out = Path(out_path)
    # np.save appends .npy to names without it; write exactly where asked.
    with open(out, "wb") as handle:
        np.save(handle, volume)
    return grid
