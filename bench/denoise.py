"""Benchmark: FBP vs Gaussian filter vs BM3D vs the U-Net on held-out low-dose and sparse-view CT.

    bash deploy/install.sh test,bench    # once: bm3d, PyWavelets, pydicom-data
    .venv/bin/python bench/denoise.py [--model PT] [--slices 20] [--json OUT.json] [--figure docs/img/x.png]

Test set: ``--slices`` simulated 512x512 slices from seed 3000 (training uses
seed 1000, validation 2000), slice 0 the Shepp-Logan head; each at quarter
dose (projection-domain Poisson, I0 = 5e5, binomial thinning, 384 views,
Hamming ramp) and at sparse view (50-150 views, full-dose noise), both
against the noiseless 384-view FBP.  Real CT: the uncompressed CT slices
pydicom and pydicom-data ship (CT_small.dcm, 693_UNCR.dcm, 693_UNCI.dcm),
clipped to [-1000, 3071] HU, projected with their own pixel spacing, then
quarter dose as above.

Baselines are tuned on the validation slices (seed 2000), per task: the
Gaussian filter's sigma (scipy.ndimage) over a grid; BM3D (PyPI ``bm3d``,
default profile) gets per slice ``sigma = factor x`` the slice's noise
estimated blind (``skimage.restoration.estimate_sigma``), the factor tuned on
a coarse grid (FBP noise is correlated, so the wavelet estimate is ~5x low, and the noise
varies 5x between slices).  Metrics are
``denoise.metrics`` (W400/L40 window to [0, 1], PSNR data range 1, SSIM 11x11
Gaussian sigma 1.5).  Times are wall-clock per 512x512 slice on this CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would hide the package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from denoise import simulate  # noqa: E402
from denoise.checkpoints import load_checkpoint  # noqa: E402
from denoise.dataset import SimulationConfig, build_pair_set  # noqa: E402
from denoise.infer import denoise_slices, resolve_ensemble, resolve_precision  # noqa: E402
from denoise.metrics import noise_std_hu, psnr, ssim  # noqa: E402

GAUSSIAN_SIGMAS_PX = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)
# BM3D's sigma per slice = factor x the slice's noise estimated blind (scikit-image's wavelet MAD):
# the FBP noise differs 5x between a head and a large abdomen, so one sigma for all slices is unfair to BM3D.
BM3D_FACTORS = {"quarter": (6.0, 8.0, 11.0, 15.0, 20.0), "sparse": (8.0, 14.0, 20.0, 30.0)}
REAL_CT = ("CT_small.dcm", "693_UNCR.dcm", "693_UNCI.dcm")


def gaussian(hu: np.ndarray, sigma_px: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.stack([gaussian_filter(s, sigma_px) for s in np.atleast_3d(hu).reshape(-1, *hu.shape[-2:])]).reshape(hu.shape)


def bm3d_denoise(hu: np.ndarray, sigma_hu: float) -> np.ndarray:
    import bm3d

    scale = 1000.0  # BM3D works on any scale; sigma in the same units
    out = [np.asarray(bm3d.bm3d(s / scale, sigma_psd=sigma_hu / scale), dtype=np.float32) * scale
           for s in hu.reshape(-1, *hu.shape[-2:])]
    return np.stack(out).reshape(hu.shape)


def estimated_noise_hu(hu: np.ndarray) -> float:
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(hu.astype(np.float64)))


class Bm3dCache:
    """BM3D outputs saved per input slice and sigma (they do not depend on the model), so re-runs are cheap."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, hu: np.ndarray, factor: float) -> np.ndarray:
        """BM3D of each slice with sigma = ``factor`` x its estimated noise."""
        import hashlib

        out = []
        for s in hu.reshape(-1, *hu.shape[-2:]):
            sigma_hu = factor * estimated_noise_hu(s)
            key = hashlib.sha256(np.ascontiguousarray(s, dtype=np.float32).tobytes()).hexdigest()[:16]
            path = self.folder / f"{key}-sigma{sigma_hu:g}.npy"
            if path.exists():
                out.append(np.load(path))
            else:
                out.append(bm3d_denoise(s, sigma_hu))
                np.save(path, out[-1])
        return np.stack(out).reshape(hu.shape)


def scores(output: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {"psnr_db": psnr(output, reference), "ssim": ssim(output, reference)}


def tune(method, noisy: np.ndarray, reference: np.ndarray, grid) -> tuple[float, dict[float, float]]:
    results = {g: psnr(method(noisy, g), reference) for g in grid}
    return max(results, key=results.get), results


def real_ct_pairs(rng: np.random.Generator, config: SimulationConfig) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    import pydicom
    from pydicom.data import get_testdata_file

    names, pairs = [], []
    for name in REAL_CT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = get_testdata_file(name)
        if path is None:
            continue
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        hu = np.clip(hu, -1000.0, 3071.0)
        pixel_mm = float(ds.PixelSpacing[0])
        pair = simulate.low_dose_pair(hu, pixel_mm=pixel_mm, i0=config.i0, dose_fractions=(config.dose_fraction,),
                                      n_views=config.n_views, filter=config.filter, rng=rng)
        names.append(f"{name} ({hu.shape[0]}x{hu.shape[1]}, {pixel_mm:.2f} mm)")
        pairs.append({"reference": pair["clean"], "quarter": pair[f"dose-{config.dose_fraction:g}"]})
    return names, pairs


def time_per_slice(fn, image: np.ndarray, repeat: int = 3, warm_up: bool = True) -> float:
    if warm_up:
        fn(image)
    started = time.perf_counter()
    for _ in range(repeat):
        fn(image)
    return (time.perf_counter() - started) / repeat


def figure(path: Path, noisy, bm3d_out, unet_out, reference, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("quarter-dose FBP", noisy), ("BM3D", bm3d_out), ("U-Net", unet_out), ("reference (noiseless FBP)", reference)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for ax, (label, image) in zip(axes, panels):
        ax.imshow(np.clip(image, -160, 240), cmap="gray", vmin=-160, vmax=240)
        extra = "" if image is reference else f"\n{psnr(image, reference):.2f} dB, SSIM {ssim(image, reference):.3f}"
        ax.set_title(label + extra, fontsize=10)
        ax.axis("off")
    fig.suptitle(title + " (W400/L40)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the suptitle above the panel titles
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped one)")
    parser.add_argument("--slices", type=int, default=20, help="held-out 512x512 test slices")
    parser.add_argument("--tune-slices", type=int, default=2, help="validation slices used to tune the baselines")
    parser.add_argument("--cache-dir", type=Path, default=Path(".stack/denoise-bench/cache"))
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of one test slice: FBP / BM3D / U-Net / reference")
    parser.add_argument("--real-figure", type=Path, default=None,
                        help="PNG of the first real CT slice at quarter dose: FBP / BM3D / U-Net / reference")
    parser.add_argument("--no-bm3d", action="store_true", help="skip BM3D (slow; outputs are cached under --cache-dir)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="the U-Net's precision on this CPU (default: the commands' auto, bfloat16 where the "
                             "CPU has bfloat16 instructions)")
    parser.add_argument("--ensemble", type=int, default=None, choices=(1, 2, 4, 8),
                        help="also score the U-Net's self-ensemble of this many mirrored copies")
    args = parser.parse_args()
    missing = [name for name in (() if args.no_bm3d else ("bm3d", "pywt")) if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"bench/denoise.py needs {', '.join(missing)} (the baselines): "
                         f"bash deploy/install.sh test,bench  (or run with --no-bm3d)")

    config = SimulationConfig()
    net, meta = load_checkpoint(args.model)
    print(f"model {Path(meta['path']).name} (version {meta['version']}, {meta['parameters']:,} parameters); "
          f"torch threads {torch.get_num_threads()}", flush=True)
    t0 = time.perf_counter()
    test = build_pair_set(args.cache_dir, 3000, args.slices, config, include_shepp_logan=True)
    val = build_pair_set(args.cache_dir, 2000, args.tune_slices, config)
    print(f"test set {len(test)} slices, validation {len(val)}: {time.perf_counter() - t0:.0f} s", flush=True)
    noise = [noise_std_hu(q, r) for q, r in zip(test.quarter, test.reference)]
    print(f"quarter-dose noise in soft tissue: median {np.median(noise):.1f} HU (range {min(noise):.1f}-{max(noise):.1f})")

    precision = resolve_precision(args.precision, "cpu")
    ensemble = resolve_ensemble(args.ensemble, precision)
    results: dict = {"model": {k: meta[k] for k in ("version", "model", "parameters")}, "precision": precision,
                     "ensemble": ensemble, "slices": len(test),
                     "sparse_views": test.sparse_views.tolist(), "noise_hu_median": float(np.median(noise)),
                     "machine": f"{os.cpu_count()} cores, {platform.platform()}", "tasks": {}, "tuning": {}}
    # the U-Net as the commands run it by default (or as the options say), and one float32 pass beside it
    unet = lambda hu: denoise_slices(net, hu, tile_px=512, batch_size=1, precision=precision,  # noqa: E731
                                     ensemble=ensemble)
    unet_label = f"U-Net {meta['version']}" + ("" if (precision, ensemble) == ("float32", 1) else
                                               f" {precision} x{ensemble}")
    ensembled = {}
    if (precision, ensemble) != ("float32", 1):
        ensembled[f"U-Net {meta['version']} float32 x1"] = lambda hu: denoise_slices(net, hu, tile_px=512, batch_size=1)
    print(f"U-Net: {precision}, {'one pass' if ensemble == 1 else f'self-ensemble of {ensemble}'}", flush=True)
    outputs = {}
    bm3d_cached = Bm3dCache(args.cache_dir / "bm3d")
    for task in ("quarter", "sparse"):
        noisy, reference = test.inputs(task), test.reference
        sigma_g, table_g = tune(gaussian, val.inputs(task), val.reference, GAUSSIAN_SIGMAS_PX)
        row = {"FBP": scores(noisy, reference), f"Gaussian (sigma {sigma_g} px)": scores(gaussian(noisy, sigma_g), reference)}
        results["tuning"][task] = {"gaussian_sigma_px": sigma_g, "gaussian_grid": table_g}
        if not args.no_bm3d:
            t = time.perf_counter()
            factor, table_b = tune(bm3d_cached, val.inputs(task)[: args.tune_slices], val.reference[: args.tune_slices],
                                   BM3D_FACTORS[task])
            results["tuning"][task].update(bm3d_factor=factor, bm3d_grid=table_b)
            print(f"{task}: BM3D sigma factor {factor} tuned in {time.perf_counter() - t:.0f} s {table_b}", flush=True)
            bm3d_out = bm3d_cached(noisy, factor)
            row[f"BM3D (sigma {factor:g} x estimate)"] = scores(bm3d_out, reference)
            outputs[(task, "bm3d")] = bm3d_out
        unet_out = unet(noisy)
        outputs[(task, "unet")] = unet_out
        row[unet_label] = scores(unet_out, reference)
        for label, method in ensembled.items():
            row[label] = scores(method(noisy), reference)
        sl = {"FBP": scores(noisy[:1], reference[:1]), "U-Net": scores(unet_out[:1], reference[:1])}
        if (task, "bm3d") in outputs:
            sl["BM3D"] = scores(outputs[(task, "bm3d")][:1], reference[:1])
        results["tasks"][task] = row
        results["tasks"][f"{task}, Shepp-Logan slice"] = sl
        for name, s in row.items():
            print(f"{task:8s} {name:28s} PSNR {s['psnr_db']:6.2f} dB  SSIM {s['ssim']:.4f}", flush=True)

    names, real = real_ct_pairs(np.random.default_rng(4000), config)
    if real:
        row = {}
        tuned = results["tuning"]["quarter"]
        methods = {"FBP": lambda x: x, f"Gaussian (sigma {tuned['gaussian_sigma_px']} px)": lambda x: gaussian(x, tuned["gaussian_sigma_px"]),
                   unet_label: unet, **ensembled}
        if "bm3d_factor" in tuned:
            methods[f"BM3D (sigma {tuned['bm3d_factor']:g} x estimate)"] = lambda x: bm3d_cached(x, tuned["bm3d_factor"])
        for label, method in methods.items():
            per = [scores(method(p["quarter"][None])[0][None], p["reference"][None]) for p in real]
            row[label] = {"psnr_db": float(np.mean([s["psnr_db"] for s in per])),
                          "ssim": float(np.mean([s["ssim"] for s in per])), "per_slice": per}
            print(f"real CT  {label:28s} PSNR {row[label]['psnr_db']:6.2f} dB  SSIM {row[label]['ssim']:.4f}  "
                  + "  ".join(f"{s['psnr_db']:.2f}" for s in per), flush=True)
        results["tasks"]["real CT, quarter dose"] = row
        if args.real_figure and "bm3d_factor" in tuned:
            first = real[0]
            figure(args.real_figure, first["quarter"], bm3d_cached(first["quarter"][None], tuned["bm3d_factor"])[0],
                   unet(first["quarter"][None])[0], first["reference"], f"real CT {names[0]}, quarter dose")
        results["real_ct"] = names
        results["real_ct_noise_hu"] = [noise_std_hu(p["quarter"], p["reference"]) for p in real]
        print("real CT quarter-dose noise (HU): " + ", ".join(f"{n:.1f}" for n in results["real_ct_noise_hu"]))

    image = test.quarter[1]
    timing = {unet_label: time_per_slice(unet, image), "Gaussian": time_per_slice(lambda x: gaussian(x, 1.0), image)}
    for label, method in ensembled.items():
        timing[label] = time_per_slice(method, image)
    if not args.no_bm3d:
        timing["BM3D"] = time_per_slice(lambda x: bm3d_denoise(x, 5.0 * estimated_noise_hu(x)), image, repeat=1,
                                        warm_up=False)
    results["seconds_per_512_slice"] = timing
    print("seconds per 512x512 slice: " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()), flush=True)

    if args.figure and ("quarter", "bm3d") in outputs:
        k = 1
        figure(args.figure, test.quarter[k], outputs[("quarter", "bm3d")][k], outputs[("quarter", "unet")][k],
               test.reference[k], f"held-out test slice {k}, quarter dose")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
