"""Image quality on a HU display window: PSNR and SSIM, one definition for tests, training and benchmarks.

Both metrics first map HU through a window (default W400/L40, the
soft-tissue window) to ``[0, 1]``: ``clip((HU - (L - W/2)) / W, 0, 1)``, so the
**data range is 1** and errors in air or bone beyond the window do not count,
as on a reader's screen.

* PSNR = ``10 log10(1 / MSE)`` in dB over all pixels of the windowed images.
* SSIM is Wang et al. (IEEE TIP 2004): an 11x11 Gaussian window of sigma 1.5
  (a 5-pixel radius, as scipy's ``gaussian_filter`` with ``truncate=3.5``),
  ``K1 = 0.01``, ``K2 = 0.03``, population (not sample) covariances, averaged
  over the pixels whose window lies wholly inside the image (a 5-pixel border
  is left out).  This equals scikit-image's
  ``structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)``; the tests check it.

Arrays may be numpy or torch, shaped ``[H, W]`` or ``[N, H, W]`` (one value
per image, or their mean with ``reduction="mean"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Window", "SOFT_TISSUE", "apply_window", "psnr", "ssim", "ssim_windowed", "psnr_ssim", "noise_std_hu"]


@dataclass(frozen=True)
class Window:
    """A display window in HU."""

    width_hu: float = 400.0
    level_hu: float = 40.0

    def __post_init__(self) -> None:
        if not self.width_hu > 0:
            raise ValueError(f"width_hu: expected a positive window width, got {self.width_hu}")

    @property
    def low_hu(self) -> float:
        return self.level_hu - self.width_hu / 2.0


SOFT_TISSUE = Window(400.0, 40.0)

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # int(3.5 * 1.5 + 0.5): scipy's truncation, an 11x11 window
_K1, _K2 = 0.01, 0.03


def _tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    if t.ndim not in (2, 3):
        raise ValueError(f"image: expected [H, W] or [N, H, W], got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    return t[None] if t.ndim == 2 else t


def apply_window(hu: np.ndarray | torch.Tensor, window: Window = SOFT_TISSUE):
    """HU -> ``[0, 1]`` through the window (same type as the input)."""
    scaled = (hu - window.low_hu) / window.width_hu
    return scaled.clamp(0.0, 1.0) if isinstance(scaled, torch.Tensor) else np.clip(scaled, 0.0, 1.0)


def _check_pair(test: torch.Tensor, reference: torch.Tensor) -> None:
    if test.shape != reference.shape:
        raise ValueError(f"images: expected the same shape, got {tuple(test.shape)} and {tuple(reference.shape)}")


def _reduce(values: torch.Tensor, reduction: str) -> np.ndarray | float:
    if reduction == "mean":
        return float(values.mean())
    if reduction == "none":
        return values.cpu().numpy()
    raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")


def psnr(test_hu, reference_hu, window: Window = SOFT_TISSUE, *, reduction: str = "mean"):
    """PSNR in dB of windowed images, data range 1 (identical images give +inf)."""
    a, b = apply_window(_tensor(test_hu), window), apply_window(_tensor(reference_hu), window)
    _check_pair(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    return _reduce(10.0 * torch.log10(1.0 / mse), reduction)


def _gaussian_kernel(device: torch.device) -> torch.Tensor:
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def _filter(images: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over ``[N, 1, H, W]``, valid region only (no padding)."""
    out = F.conv2d(images, g.view(1, 1, 1, -1))
    return F.conv2d(out, g.view(1, 1, -1, 1))


def ssim_windowed(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of ``[N, H, W]`` images already on a ``data_range`` scale, one value per image."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"images: SSIM needs at least 11x11 pixels, got {tuple(a.shape[-2:])}")
    g = _gaussian_kernel(a.device)
    x, y = a[:, None], b[:, None]
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mu_x**2
    syy = _filter(y * y, g) - mu_y**2
    sxy = _filter(x * y, g) - mu_x * mu_y
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(dim=1)


def ssim(test_hu, reference_hu, window: Window = SOFT_TISSUE, *, reduction: str = "mean"):
    """SSIM of windowed images, data range 1, 11x11 Gaussian window (sigma 1.5)."""
    a, b = apply_window(_tensor(test_hu), window), apply_window(_tensor(reference_hu), window)
    return _reduce(ssim_windowed(a, b), reduction)


def psnr_ssim(test_hu, reference_hu, window: Window = SOFT_TISSUE) -> tuple[float, float]:
    """Mean PSNR (dB) and mean SSIM over the images."""
    return psnr(test_hu, reference_hu, window), ssim(test_hu, reference_hu, window)


def noise_std_hu(noisy_hu: np.ndarray, clean_hu: np.ndarray, low_hu: float = -200.0, high_hu: float = 300.0) -> float:
    """Standard deviation of ``noisy - clean`` in HU where the clean image is soft tissue."""
    mask = (clean_hu > low_hu) & (clean_hu < high_hu)
    if not mask.any():
        return math.nan
    return float((np.asarray(noisy_hu) - np.asarray(clean_hu))[mask].std())
