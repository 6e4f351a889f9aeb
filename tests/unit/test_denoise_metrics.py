"""PSNR and SSIM on HU windows agree with scikit-image's on known pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from denoise.metrics import SOFT_TISSUE, Window, apply_window, noise_std_hu, psnr, ssim
from denoise.phantoms import shepp_logan_hu


def _pairs():
    rng = np.random.default_rng(7)
    clean = shepp_logan_hu(96).astype(np.float64)
    yield clean, clean + rng.normal(0, 30, clean.shape)
    yield clean, clean + rng.normal(0, 120, clean.shape)
    smooth = rng.normal(40, 80, (40, 57)).cumsum(axis=1) / 10
    yield smooth, smooth[::-1]


@pytest.mark.parametrize("pair", list(_pairs()), ids=["sl-noise30", "sl-noise120", "rect-flipped"])
def test_psnr_and_ssim_match_scikit_image(pair):
    reference, test = pair
    a, b = apply_window(test), apply_window(reference)
    assert psnr(test, reference) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1.0), abs=1e-9)
    expected = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim(test, reference) == pytest.approx(expected, abs=1e-9)


def test_window_maps_level_and_width_to_unit_range():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    assert apply_window(hu).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert apply_window(torch.tensor(hu), Window(2000, 0)).tolist() == pytest.approx([0.0, 0.42, 0.52, 0.62, 1.0])


def test_batches_identical_images_and_errors():
    clean = shepp_logan_hu(32).astype(np.float64)
    stack = np.stack([clean, clean + 10])
    values = psnr(stack, np.stack([clean, clean]), reduction="none")
    inside = ((clean > -160) & (clean < 230)).mean()  # where a 10 HU shift stays inside the window
    assert math.isinf(values[0]) and values[1] == pytest.approx(10 * math.log10(1 / (inside * (10 / 400) ** 2)), abs=0.3)
    assert ssim(clean, clean) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        psnr(clean, clean[:-1])
    with pytest.raises(ValueError, match="11x11"):
        ssim(clean[:8, :8], clean[:8, :8])
    with pytest.raises(ValueError, match="width_hu"):
        Window(0, 40)
    assert noise_std_hu(clean + 5, clean) == pytest.approx(0.0, abs=1e-4)
    assert SOFT_TISSUE.low_hu == -160
