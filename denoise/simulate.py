"""Low-dose, sparse-view and image-noise versions of HU slices, simulated where the noise arises.

Projection domain (the physics of a low-dose scan):

1. HU -> linear attenuation ``mu = mu_water (1 + HU / 1000)`` in 1/mm
   (``mu_water`` = ``reconstruct.dicom_io.MU_WATER_PER_MM``, ~70 keV).
2. A 2D parallel-beam sinogram ``[view, bin]`` of line integrals over 180
   degrees: each ray is sampled once per pixel width with bilinear
   interpolation (``forward_project``).
3. Photon counts at full dose ``N ~ Poisson(I0 exp(-p))`` with ``I0`` photons
   per detector bin and view (default 5e5); a lower dose fraction ``f`` keeps
   each photon with probability ``f`` (binomial thinning, so a quarter-dose
   scan is a sub-sample of the very photons of the full-dose one); the noisy
   line integral is ``-log(max(N, 1) / (f I0))``.
4. Filtered back-projection (``fbp``): the ramp filter of
   ``reconstruct.fdk.ramp`` (same discrete Ram-Lak kernel and windows as FDK)
   then linear-interpolating back-projection, ``pi / n_views`` per view.
5. Back to HU.

Sparse view reconstructs from 50 to 150 evenly spaced views (streaks);
image-domain noise adds Gaussian noise of ``sigma`` on an 8-bit display
scale of a window (sigma 30 of 255 on W400 is 47 HU).

The reference image of every simulated pair is the **noiseless FBP**: the same
projector, views, filter and back-projector without noise (for sparse view:
with all views), so a metric measures noise and streaks, not the blur every
FBP has.  Outside the field of view (the inscribed circle) every
reconstruction is set to air.  ``docs/denoising.md`` gives the calibration:
384 views, Hamming-windowed ramp, 0.7 mm pixels and I0 = 5e5 give a median
noise of ~28 HU in soft tissue at quarter dose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from reconstruct.fdk.ramp import ramp_filter

__all__ = [
    "MU_WATER_PER_MM",
    "ParallelBeam",
    "hu_to_mu",
    "mu_to_hu",
    "forward_project",
    "fbp",
    "field_of_view_mask",
    "poisson_counts",
    "thin_counts",
    "counts_to_line_integrals",
    "low_dose_pair",
    "sparse_view",
    "gaussian_noise",
]

MU_WATER_PER_MM = 0.0195  # the value reconstruct.dicom_io uses for HU
DEFAULT_I0 = 5e5  # photons per detector bin and view at full dose
DEFAULT_VIEWS = 384  # over 180 degrees; with I0 = 5e5 and Hamming, quarter dose gives ~28 HU
DEFAULT_FILTER = "hamming"
AIR_HU = -1000.0


@dataclass(frozen=True)
class ParallelBeam:
    """A 2D parallel-beam scan of a square image.

    Attributes:
        image_size_px: rows = columns of the reconstructed image.
        pixel_mm: pixel size of the image, mm.
        n_views: views evenly spaced over [0, 180) degrees.
        n_bins: detector bins (default: the image size; the field of view is the inscribed circle).
        bin_mm: detector bin width, mm (default: the pixel size).
    """

    image_size_px: int
    pixel_mm: float = 0.7
    n_views: int = DEFAULT_VIEWS
    n_bins: int | None = None
    bin_mm: float | None = None

    def __post_init__(self) -> None:
        if self.image_size_px < 4:
            raise ValueError(f"image_size_px: expected at least 4, got {self.image_size_px}")
        if not (math.isfinite(self.pixel_mm) and self.pixel_mm > 0):
            raise ValueError(f"pixel_mm: expected a positive size, got {self.pixel_mm}")
        if self.n_views < 1:
            raise ValueError(f"n_views: expected at least 1 view, got {self.n_views}")

    @property
    def bins(self) -> int:
        if self.n_bins is not None:
            return self.n_bins
        return self.image_size_px

    @property
    def bin_width_mm(self) -> float:
        return self.bin_mm if self.bin_mm is not None else self.pixel_mm

    def angles_rad(self) -> np.ndarray:
        return np.arange(self.n_views) * (math.pi / self.n_views)

    def with_views(self, n_views: int) -> "ParallelBeam":
        return ParallelBeam(self.image_size_px, self.pixel_mm, n_views, self.n_bins, self.bin_mm)


def hu_to_mu(hu: np.ndarray | torch.Tensor, mu_water_per_mm: float = MU_WATER_PER_MM):
    """HU -> attenuation in 1/mm (negative values, below air, are kept; they are noise)."""
    return mu_water_per_mm * (1.0 + hu / 1000.0)


def mu_to_hu(mu: np.ndarray | torch.Tensor, mu_water_per_mm: float = MU_WATER_PER_MM):
    return 1000.0 * (mu / mu_water_per_mm - 1.0)


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array, dtype=torch.float32)


def _unit_axis(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pixel centres of an ``n``-pixel axis in grid_sample's units (align_corners=False), float32."""
    return (torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0) / (n / 2.0)


def forward_project(mu_per_mm: np.ndarray | torch.Tensor, scan: ParallelBeam, *, views_per_chunk: int = 16,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """Line integrals ``[n_views, n_bins]`` float32 of an attenuation image ``[H, W]`` (1/mm).

    Ray ``(theta, t)`` runs along ``(-sin theta, cos theta)`` at signed
    distance ``t`` from the centre along ``(cos theta, sin theta)`` (x to the
    right, y up).  The field of view is the image's inscribed circle, as on a
    scanner: rays are sampled once per pixel width over the image width
    (bilinear interpolation), so anything in the corners outside that circle
    is not measured.  ``n_bins`` must equal the image size here.  The
    interpolation runs on ``device`` (a CUDA device makes it some hundred
    times faster than a CPU core); the result comes back as a numpy array.
    """
    image = _as_tensor(mu_per_mm).to(device)
    n = scan.image_size_px
    if tuple(image.shape) != (n, n):
        raise ValueError(f"image: expected shape ({n}, {n}) for this scan, got {tuple(image.shape)}")
    if scan.bins != n or scan.bin_width_mm != scan.pixel_mm:
        raise ValueError(f"scan: the projector needs n_bins = image size ({n}) and bin_mm = pixel_mm, "
                         f"got {scan.bins} bins of {scan.bin_width_mm} mm")
    axis = _unit_axis(n, device)
    angles = torch.as_tensor(scan.angles_rad(), dtype=torch.float32, device=device)
    out = torch.empty((scan.n_views, n), dtype=torch.float32, device=device)
    source = image[None, None]
    for start in range(0, scan.n_views, views_per_chunk):
        theta = angles[start : start + views_per_chunk]
        c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        t, along = axis[None, None, :], axis[None, :, None]  # (c, samples, bins)
        x = t * c - along * s
        y = t * s + along * c
        grid = torch.stack((x, -y), dim=-1)  # grid_sample: x -> column, -y -> row
        samples = F.grid_sample(source.expand(len(theta), -1, -1, -1), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)
        out[start : start + len(theta)] = samples[:, 0].sum(dim=1) * scan.pixel_mm
    return out.cpu().numpy()


def fbp(sinogram: np.ndarray | torch.Tensor, scan: ParallelBeam, *, filter: str = DEFAULT_FILTER,
        views_per_chunk: int = 16, device: torch.device | str = "cpu") -> np.ndarray:
    """Filtered back-projection of ``[n_views, n_bins]`` line integrals -> ``[H, W]`` attenuation (1/mm).

    The ramp filter is ``reconstruct.fdk.ramp.ramp_filter`` (windows
    ``ram-lak``, ``shepp-logan``, ``cosine``, ``hamming``, ``hann``);
    back-projection interpolates linearly between bins and weights each view
    by ``pi / n_views`` (the parallel-beam FBP over 180 degrees); both run on ``device``.
    """
    sino = _as_tensor(sinogram).to(device)
    if tuple(sino.shape) != (scan.n_views, scan.bins):
        raise ValueError(f"sinogram: expected shape ({scan.n_views}, {scan.bins}), got {tuple(sino.shape)}")
    filtered = ramp_filter(sino.contiguous(), scan.bin_width_mm, window=filter)
    n = scan.image_size_px
    scale = (n * scan.pixel_mm) / (scan.bins * scan.bin_width_mm)  # image extent over detector extent
    x, y = _unit_axis(n, device)[None, :] * scale, -_unit_axis(n, device)[:, None] * scale  # row 0 at the top: y up
    angles = torch.as_tensor(scan.angles_rad(), dtype=torch.float32, device=device)
    image = torch.zeros((n, n), dtype=torch.float32, device=device)
    for start in range(0, scan.n_views, views_per_chunk):
        theta = angles[start : start + views_per_chunk]
        t = x[None] * torch.cos(theta)[:, None, None] + y[None] * torch.sin(theta)[:, None, None]  # (c, n, n)
        grid = torch.stack((t, torch.zeros_like(t)), dim=-1)
        rows = filtered[start : start + len(theta), None, None, :]  # (c, 1, 1, bins)
        image += F.grid_sample(rows, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0].sum(0)
    image *= math.pi / scan.n_views
    return image.cpu().numpy()


def field_of_view_mask(size: int) -> np.ndarray:
    """``[size, size]`` bool: pixel centres inside the inscribed circle (the measured field of view)."""
    axis = (np.arange(size) - (size - 1) / 2.0) / (size / 2.0)
    return axis[None, :] ** 2 + axis[:, None] ** 2 <= 1.0


def _reconstruct_hu(sinogram: np.ndarray, scan: ParallelBeam, filter: str,
                    device: torch.device | str = "cpu") -> np.ndarray:
    hu = mu_to_hu(fbp(sinogram, scan, filter=filter, device=device))
    return np.where(field_of_view_mask(scan.image_size_px), hu, AIR_HU).astype(np.float32)


def poisson_counts(line_integrals: np.ndarray, i0: float, rng: np.random.Generator) -> np.ndarray:
    """Detected photons ``Poisson(i0 exp(-p))`` per bin, int64."""
    if not (math.isfinite(i0) and i0 > 0):
        raise ValueError(f"i0: expected a positive photon count, got {i0}")
    return rng.poisson(i0 * np.exp(-np.asarray(line_integrals, dtype=np.float64)))


def thin_counts(counts: np.ndarray, dose_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Binomial thinning: each detected photon is kept with probability ``dose_fraction``."""
    if not (0.0 < dose_fraction <= 1.0):
        raise ValueError(f"dose_fraction: expected a fraction in (0, 1], got {dose_fraction}")
    return counts if dose_fraction == 1.0 else rng.binomial(counts, dose_fraction)


def counts_to_line_integrals(counts: np.ndarray, incident: float) -> np.ndarray:
    """``-log(N / incident)`` with ``N`` clamped to >= 1 (a bin that saw no photon)."""
    return (-np.log(np.maximum(counts, 1) / incident)).astype(np.float32)


def low_dose_pair(hu: np.ndarray, *, pixel_mm: float = 0.7, i0: float = DEFAULT_I0,
                  dose_fractions: tuple[float, ...] = (1.0, 0.25), n_views: int = DEFAULT_VIEWS,
                  filter: str = DEFAULT_FILTER, rng: np.random.Generator,
                  device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Noiseless and noisy FBPs of one HU slice ``[H, W]``, all in HU float32.

    Returns ``{"clean": ..., "dose-1": ..., "dose-0.25": ...}``: the noiseless
    FBP and one FBP per dose fraction, all from the same full-dose photons
    (lower doses are binomial thinnings of them).  Projection and FBP run on
    ``device``; the photon noise is drawn from ``rng`` on the CPU at the same
    level on every device, though not always the same draw: a last-bit
    difference in one bin's mean can change how many numbers the Poisson
    sampler takes, and with it every later draw.
    """
    scan = ParallelBeam(hu.shape[-1], pixel_mm, n_views)
    if hu.shape != (scan.image_size_px, scan.image_size_px):
        raise ValueError(f"hu: expected a square slice, got shape {hu.shape}")
    sinogram = forward_project(hu_to_mu(hu.astype(np.float32)), scan, device=device)
    out = {"clean": _reconstruct_hu(sinogram, scan, filter, device)}
    full = poisson_counts(sinogram, i0, rng)
    for fraction in dose_fractions:
        counts = thin_counts(full, fraction, rng)
        noisy = counts_to_line_integrals(counts, fraction * i0)
        out[f"dose-{fraction:g}"] = _reconstruct_hu(noisy, scan, filter, device)
    return out


def sparse_view(hu: np.ndarray, n_views: int, *, pixel_mm: float = 0.7, i0: float | None = DEFAULT_I0,
                filter: str = DEFAULT_FILTER, rng: np.random.Generator | None = None,
                device: torch.device | str = "cpu") -> np.ndarray:
    """FBP from ``n_views`` evenly spaced views (streaks), HU ``[H, W]`` float32.

    With ``i0`` the views carry full-dose Poisson noise; ``i0=None`` is noiseless.
    """
    if not 2 <= n_views:
        raise ValueError(f"n_views: expected at least 2 views, got {n_views}")
    scan = ParallelBeam(hu.shape[-1], pixel_mm, n_views)
    sinogram = forward_project(hu_to_mu(hu.astype(np.float32)), scan, device=device)
    if i0 is not None:
        if rng is None:
            raise ValueError("rng: expected a numpy Generator when i0 is given, got None")
        sinogram = counts_to_line_integrals(poisson_counts(sinogram, i0, rng), i0)
    return _reconstruct_hu(sinogram, scan, filter, device)


def gaussian_noise(hu: np.ndarray, rng: np.random.Generator, *, sigma_8bit: float = 30.0,
                   window_width_hu: float = 400.0) -> np.ndarray:
    """Image-domain Gaussian noise: ``sigma_8bit / 255`` of the window width, in HU."""
    if sigma_8bit < 0:
        raise ValueError(f"sigma_8bit: expected a non-negative value, got {sigma_8bit}")
    sigma_hu = sigma_8bit / 255.0 * window_width_hu
    return (hu + rng.normal(0.0, sigma_hu, size=hu.shape)).astype(np.float32)
