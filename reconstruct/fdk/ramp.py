"""Ramp filtering of projections along u (detector rows), by FFT.

Each detector row is zero-padded to ``padded_length(nu)`` (the next power of
two >= 2 nu, so the circular convolution equals the linear one over the
row), multiplied in frequency by the transfer function of the *discrete*
Ram-Lak kernel (Kak & Slaney eq. 3.61, sampled in space then FFT'd), times an
optional apodisation window, and cropped back.

Sampling the kernel in space rather than using ``|f|`` matters at low
frequencies: the discrete kernel's DC value is small but not zero, which is
what a band-limited ramp truncated to the padded length must have; ``|f|``
zeroes the mean of every row and biases the reconstruction.

The kernel is ``h[0] = 1/(4 du)``, ``h[n odd] = -1/(pi^2 n^2 du)``, else 0:
Kak & Slaney's ``h(n tau)`` times the pixel size ``du`` (the ``tau`` of the
convolution sum, eq. 3.69), so ``filtered = sum_n h[n] p[m - n]`` directly
approximates the continuous ramp convolution; units: 1/mm per unit line
integral (RTK's FFTRampImageFilter uses the same kernel and scale).

Windows (``x`` = frequency / (cutoff * Nyquist), all are 0 for ``x > 1``):
``ram-lak`` 1, ``shepp-logan`` sinc(x/2) = sin(pi x / 2) / (pi x / 2),
``cosine`` cos(pi x / 2), ``hamming`` 0.54 + 0.46 cos(pi x),
``hann`` 0.5 + 0.5 cos(pi x).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["WINDOWS", "padded_length", "ramp_kernel", "ramp_transfer_function", "ramp_filter"]

WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")


def padded_length(nu: int) -> int:
    """The FFT length: the next power of two >= 2 * nu."""
    if nu < 1:
        raise ValueError(f"nu: expected a positive detector width, got {nu}")
    return 1 << max(1, math.ceil(math.log2(2 * nu)))


def ramp_kernel(n_pad: int, spacing_mm: float) -> np.ndarray:
    """The discrete Ram-Lak kernel in circular (FFT) order, shape ``(n_pad,)``, 1/mm."""
    if n_pad < 2 or n_pad % 2:
        raise ValueError(f"n_pad: expected an even length >= 2, got {n_pad}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm: expected a positive pixel size, got {spacing_mm}")
    n = np.arange(n_pad)
    n = np.minimum(n, n_pad - n)  # distance from 0 on the circle
    kernel = np.zeros(n_pad)
    kernel[0] = 1.0 / (4.0 * spacing_mm)
    odd = n % 2 == 1
    kernel[odd] = -1.0 / (math.pi**2 * n[odd].astype(np.float64) ** 2 * spacing_mm)
    return kernel


def _window(name: str, x: np.ndarray) -> np.ndarray:
    if name == "ram-lak":
        return np.ones_like(x)
    if name == "shepp-logan":
        return np.sinc(x / 2.0)  # numpy's sinc is sin(pi t) / (pi t)
    if name == "cosine":
        return np.cos(0.5 * math.pi * x)
    if name == "hamming":
        return 0.54 + 0.46 * np.cos(math.pi * x)
    if name == "hann":
        return 0.5 + 0.5 * np.cos(math.pi * x)
    raise ValueError(f"filter: expected one of {', '.join(WINDOWS)}, got {name!r}")


def ramp_transfer_function(n_pad: int, spacing_mm: float, window: str = "ram-lak", cutoff: float = 1.0) -> np.ndarray:
    """Real transfer function for ``rfft`` bins, shape ``(n_pad // 2 + 1,)``."""
    if not (0.0 < cutoff <= 1.0):
        raise ValueError(f"cutoff: expected a fraction of the Nyquist frequency in (0, 1], got {cutoff}")
    # The kernel is real and even, so its spectrum is real: keep the real part.
    spectrum = np.fft.rfft(ramp_kernel(n_pad, spacing_mm)).real
    x = np.arange(n_pad // 2 + 1) / (n_pad / 2) / cutoff
    return spectrum * np.where(x <= 1.0, _window(window, np.minimum(x, 1.0)), 0.0)


def ramp_filter(
    projections: torch.Tensor,
    spacing_mm: float,
    *,
    window: str = "ram-lak",
    cutoff: float = 1.0,
) -> torch.Tensor:
    """Ramp-filter every row: ``(..., nu)`` float32 -> same shape, 1/mm."""
    nu = projections.shape[-1]
    n_pad = padded_length(nu)
    transfer = torch.as_tensor(
        ramp_transfer_function(n_pad, spacing_mm, window, cutoff), dtype=projections.dtype, device=projections.device
    )
    spectrum = torch.fft.rfft(projections, n=n_pad, dim=-1)  # zero-padded on the right
    spectrum *= transfer
    return torch.fft.irfft(spectrum, n=n_pad, dim=-1)[..., :nu].contiguous()
