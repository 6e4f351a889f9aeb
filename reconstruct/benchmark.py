"""Time and peak memory of ``fdk`` on analytic Shepp-Logan projections.

    python -m reconstruct.benchmark --size 256 --projections 360 --detector 256 [--device cpu]

The projections are computed first and saved to a temporary ``.npy``; the
reconstruction then runs in a fresh process that memory-maps them, so the
reported peak RSS is that of ``fdk`` (plus Python, numpy and torch), not of
the phantom projector.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _geometry(n_projections: int, detector: int):
    from .geometry import ConeBeamGeometry

    # A 250 mm field of view at the isocentre, clinical-like distances.
    return ConeBeamGeometry.circular(
        n_projections,
        source_to_isocenter_mm=1000.0,
        source_to_detector_mm=1500.0,
        detector_size_uv=detector,
        detector_spacing_uv_mm=400.0 / detector,
    )


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _run(args: argparse.Namespace) -> None:
    import torch

    from .fdk import fdk
    from .geometry import VolumeGrid

    projections = np.load(args.run, mmap_mode="r")
    geometry = _geometry(args.projections, args.detector)
    grid = VolumeGrid(args.size, 250.0 / args.size)
    baseline = _rss_mib()
    start = time.perf_counter()
    volume = fdk(projections, geometry, grid, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "size": args.size, "projections": args.projections, "detector": args.detector, "device": args.device,
        "threads": torch.get_num_threads(), "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak), "rss_before_fdk_mib": round(baseline),
        "centre_value": float(volume[args.size // 2, args.size // 2, args.size // 2]),
    }))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--projections", type=int, default=360)
    parser.add_argument("--detector", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        _run(args)
        return
    from .phantom import project_ellipsoids, shepp_logan_3d

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "projections.npy"
        geometry = _geometry(args.projections, args.detector)
        np.save(path, project_ellipsoids(shepp_logan_3d(110.0, density_scale=0.02), geometry))
        cmd = [sys.executable, "-m", "reconstruct.benchmark", "--run", str(path), "--size", str(args.size),
               "--projections", str(args.projections), "--detector", str(args.detector), "--device", args.device]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
