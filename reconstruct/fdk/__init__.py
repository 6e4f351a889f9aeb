"""FDK (Feldkamp-Davis-Kress) cone-beam reconstruction, in small stages.

Stages, each usable alone (arrays and conventions: ``reconstruct.geometry``):

* ``weighting``: cosine (Feldkamp) weights, angular gaps, short-scan
  detection and Parker weights, and their product ``projection_weights``.
* ``ramp``: ramp filter along u by zero-padded FFT with the discrete Ram-Lak
  kernel and the ram-lak / shepp-logan / cosine / hamming / hann windows.
* ``backproject``: voxel-driven backprojection with bilinear interpolation,
  in slabs along the rotation axis; ``slab_rows`` gives the detector rows a
  slab needs.
* ``core.fdk``: the pipeline over chunks of projections, on CPU or CUDA.
"""

from .backproject import backproject, slab_rows
from .core import check_fdk_inputs, fdk, filter_projections, peak_memory_estimate_bytes, resolve_device
from .ramp import WINDOWS, padded_length, ramp_filter, ramp_kernel, ramp_transfer_function
from .weighting import (
    ShortScan,
    angular_gaps,
    cosine_weights,
    detect_short_scan,
    parker_weights,
    projection_weights,
)

__all__ = [
    "fdk",
    "check_fdk_inputs",
    "slab_rows",
    "backproject",
    "filter_projections",
    "resolve_device",
    "peak_memory_estimate_bytes",
    "WINDOWS",
    "padded_length",
    "ramp_kernel",
    "ramp_transfer_function",
    "ramp_filter",
    "ShortScan",
    "angular_gaps",
    "cosine_weights",
    "detect_short_scan",
    "parker_weights",
    "projection_weights",
]
