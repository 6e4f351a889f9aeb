"""Benchmark: the U-Net's inference time and quality per precision on one device (a GPU where there is one).

    .venv/bin/python bench/denoise_device.py [--model PT ...] [--device cuda] [--slices 20] [--json OUT.json]

The test set of ``bench/denoise.py`` (seed 3000, slice 0 the Shepp-Logan
head, quarter dose and sparse view; simulated on ``--device``, so its FBPs
may differ from a CPU's in the last bits) is denoised whole-slice by each
checkpoint in each precision (``float32``; ``float16`` and ``bfloat16`` as
autocast, ``float16`` on CUDA only), ``--batch-size`` slices per forward
pass.  For each: seconds per 512x512 slice (the median of ``--repeat``
passes over all slices after one warm-up, the device synchronised, the
copies to and from the host included) and PSNR/SSIM on the W400/L40 window
(``denoise.metrics``), so a precision that costs quality shows it in the
same row.  No baselines: ``bench/denoise.py`` compares the U-Net with the
Gaussian filter and BM3D on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from denoise.checkpoints import load_checkpoint  # noqa: E402
from denoise.dataset import SimulationConfig, build_pair_set  # noqa: E402
from denoise.infer import PRECISIONS, denoise_slices, synchronise  # noqa: E402
from denoise.metrics import psnr, ssim  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", default=None,
                        help="checkpoint (repeat for several; default: the shipped one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", action="append", choices=PRECISIONS, default=None,
                        help="repeat for several (default: float32, and float16 and bfloat16 on CUDA)")
    parser.add_argument("--slices", type=int, default=20, help="held-out 512x512 test slices")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes over all slices")
    parser.add_argument("--cache-dir", type=Path, default=Path(".stack/denoise-bench/cache"))
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    precisions = args.precision or (["float32", "float16", "bfloat16"] if device.type == "cuda" else ["float32"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    started = time.perf_counter()
    test = build_pair_set(args.cache_dir, 3000, args.slices, SimulationConfig(), include_shepp_logan=True,
                          device=args.device)
    print(f"# {name}, torch {torch.__version__}; test set of {len(test)} slices in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    print(f"{'model':<22} {'precision':<9} {'s/slice':>8} {'quarter dB':>10} {'SSIM':>6} {'sparse dB':>9} {'SSIM':>6}")
    rows = []
    for path in args.model or [None]:
        net, meta = load_checkpoint(path, device=device)
        for precision in precisions:
            def run(hu: np.ndarray) -> np.ndarray:
                return denoise_slices(net, hu, tile_px=512, batch_size=args.batch_size, device=device,
                                      precision=precision)

            run(test.quarter)  # warm-up: kernels chosen, memory allocated
            times = []
            for _ in range(args.repeat):
                synchronise(device)
                t = time.perf_counter()
                quarter = run(test.quarter)
                synchronise(device)
                times.append((time.perf_counter() - t) / len(test))
            sparse = run(test.sparse)
            row = {"model": Path(meta["path"]).name, "precision": precision, "s_per_slice": statistics.median(times),
                   "quarter": {"psnr_db": psnr(quarter, test.reference), "ssim": ssim(quarter, test.reference)},
                   "sparse": {"psnr_db": psnr(sparse, test.reference), "ssim": ssim(sparse, test.reference)}}
            rows.append(row)
            print(f"{row['model']:<22} {precision:<9} {row['s_per_slice']:>8.4f} {row['quarter']['psnr_db']:>10.2f} "
                  f"{row['quarter']['ssim']:>6.4f} {row['sparse']['psnr_db']:>9.2f} {row['sparse']['ssim']:>6.4f}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "slices": len(test),
                                         "batch_size": args.batch_size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
