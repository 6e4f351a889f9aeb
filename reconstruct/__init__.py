"""Cone-beam CT reconstruction at the array level (no DICOM, no HTTP).

* ``reconstruct.geometry``: ``ConeBeamGeometry`` (RTK's circular geometry),
  ``VolumeGrid``, RTK XML and JSON I/O.
* ``reconstruct.phantom``: ellipsoid phantoms, 3D Shepp-Logan, exact line
  integrals and voxelised references.
* ``reconstruct.fdk``: FDK in stages (weights, ramp filter, backprojection),
  ``fdk()`` and ``slab_rows()`` (``from reconstruct.fdk import fdk``); needs torch.
* ``reconstruct.cli.run_fdk``: ``.npy`` + geometry file -> ``.npy`` volume.

Conventions (RTK's; rotation axis y; arrays ``[angle, v, u]`` and ``[z, y, x]``):
see ``docs/reconstruction.md``.
"""

from __future__ import annotations

from .geometry import (
    ConeBeamGeometry,
    VolumeGrid,
    read_geometry,
    read_geometry_json,
    read_rtk_geometry_xml,
    rtk_geometry_xml_text,
    write_geometry_json,
    write_rtk_geometry_xml,
)
from .cli import run_fdk  # imports torch only when called
from .phantom import Ellipsoid, project_ellipsoids, shepp_logan_3d, sphere, voxelize_ellipsoids

__all__ = [
    "ConeBeamGeometry",
    "VolumeGrid",
    "read_geometry",
    "read_geometry_json",
    "read_rtk_geometry_xml",
    "rtk_geometry_xml_text",
    "write_geometry_json",
    "write_rtk_geometry_xml",
    "Ellipsoid",
    "project_ellipsoids",
    "shepp_logan_3d",
    "sphere",
    "voxelize_ellipsoids",
    "run_fdk",
]
