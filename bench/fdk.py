"""Benchmark our FDK (``reconstruct.fdk.fdk``) against RTK's FDK on Shepp-Logan.

    .venv/bin/python bench/fdk.py [--size 128] [--projections 360] [--detector 256] [--threads 2]

1. Exact cone-beam line integrals of the 3D Shepp-Logan phantom
   (``reconstruct.phantom``) for a circular orbit (SID 1000 mm, SDD 1500 mm,
   a 400 mm detector, i.e. a 250 mm field of view at the isocentre) are
   saved to a temporary ``.npy`` together with the RTK geometry XML that
   ``reconstruct.geometry.write_rtk_geometry_xml`` writes.
2. Every method runs in its own fresh process (so its peak RSS is its own):
   ours on CPU (and on CUDA when torch sees a GPU) with this interpreter,
   RTK's ``FDKConeBeamReconstructionFilter`` with an interpreter that has
   ``itk-rtk``: this one if ``import itk`` works, else the venv
   ``.stack/bench-rtk`` (created and ``pip install itk-rtk``'d when missing).
   Both use ``--threads`` threads (``torch.set_num_threads`` / ITK's global
   default number of threads).  Volumes come back as ``.npy`` files.
3. One table: wall seconds (median of ``--runs`` timed runs after one
   warm-up; by default 3, or a single run without warm-up from 256^3 up),
   peak RSS of the worker process, RMSE and PSNR against the voxelised
   phantom on the central axial slice (perpendicular to the rotation axis y:
   ``volume[:, ny // 2, :]``), and the max abs difference to RTK's volume.

PSNR is ``20 log10(peak-to-peak of the reference slice / RMSE)``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RTK_VENV = ROOT / ".stack" / "bench-rtk"

# Acquisition and phantom (same as reconstruct.benchmark).
SID_MM, SDD_MM, DETECTOR_MM, FOV_MM = 1000.0, 1500.0, 400.0, 250.0
PHANTOM_RADIUS_MM, DENSITY_SCALE = 110.0, 0.02


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(run, runs: int, warmup: bool):
    """Median wall seconds of ``runs`` calls (after one untimed call if ``warmup``) and the last result."""
    result = run() if warmup else None
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


# ---------------------------------------------------------------- workers
def _worker_ours(args: argparse.Namespace) -> dict:
    """Run ``reconstruct.fdk.fdk``; only this interpreter's torch is needed."""
    import torch

    sys.path.insert(0, str(ROOT))
    from reconstruct.fdk import fdk
    from reconstruct.geometry import VolumeGrid, read_rtk_geometry_xml

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    projections = np.load(work / "projections.npy")
    geometry = read_rtk_geometry_xml(work / "geometry.xml", detector_size_uv=(args.detector, args.detector),
                                     detector_spacing_uv_mm=(DETECTOR_MM / args.detector,) * 2)
    grid = VolumeGrid(args.size, FOV_MM / args.size)

    def run():
        volume = fdk(projections, geometry, grid, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return volume

    seconds, volume = _timed(run, args.runs, args.warmup)
    np.save(work / f"ours-{args.device}.npy", volume)
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads()}


def _worker_rtk(args: argparse.Namespace) -> dict:
    """Run RTK's FDK; needs only numpy and itk-rtk (no torch, no ``reconstruct``)."""
    import itk
    from itk import RTK as rtk

    itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(max(args.threads, 1))
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(args.threads)
    work = Path(args.work)
    image_type = itk.Image[itk.F, 3]
    du = DETECTOR_MM / args.detector
    projections = itk.image_from_array(np.load(work / "projections.npy"))  # [angle, v, u] -> (u, v, angle)
    projections.SetSpacing([du, du, 1.0])
    projections.SetOrigin([-0.5 * (args.detector - 1) * du, -0.5 * (args.detector - 1) * du, 0.0])
    reader = rtk.ThreeDCircularProjectionGeometryXMLFileReader.New()
    reader.SetFilename(str(work / "geometry.xml"))
    reader.GenerateOutputInformation()
    geometry = reader.GetOutputObject()

    spacing = FOV_MM / args.size
    source = rtk.ConstantImageSource[image_type].New()
    source.SetSize([args.size] * 3)
    source.SetSpacing([spacing] * 3)
    source.SetOrigin([-0.5 * (args.size - 1) * spacing] * 3)  # rtkfdk's default: centred
    source.SetConstant(0.0)

    def run():
        fdk = rtk.FDKConeBeamReconstructionFilter[image_type].New()
        fdk.SetInput(0, source.GetOutput())
        fdk.SetInput(1, projections)
        fdk.SetGeometry(geometry)
        fdk.GetRampFilter().SetTruncationCorrection(0.0)  # plain Ram-Lak, as ours
        fdk.GetRampFilter().SetHannCutFrequency(0.0)
        fdk.Update()
        return itk.array_from_image(fdk.GetOutput())

    seconds, volume = _timed(run, args.runs, args.warmup)
    np.save(work / "rtk.npy", volume.astype(np.float32))
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(),
            "threads": int(itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads())}


# ---------------------------------------------------------------- driver
def _rtk_python() -> str:
    """An interpreter that can ``import itk`` with RTK: this one, or ``.stack/bench-rtk`` (made if missing)."""
    try:
        import itk  # noqa: F401
        from itk import RTK  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    python = RTK_VENV / "bin" / "python"
    check = [str(python), "-c", "from itk import RTK"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python)
    print(f"installing itk-rtk into {RTK_VENV} ...", file=sys.stderr, flush=True)
    RTK_VENV.parent.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(RTK_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "itk-rtk"], check=True)
    subprocess.run(check, check=True)
    return str(python)


def _spawn(python: str, method: str, args: argparse.Namespace, work: Path, device: str = "cpu") -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", method, "--work", str(work), "--device", device,
           "--size", str(args.size), "--projections", str(args.projections), "--detector", str(args.detector),
           "--threads", str(args.threads), "--runs", str(args.runs)] + (["--warmup"] if args.warmup else [])
    # Same thread count for every library underneath (OpenMP, MKL, ITK).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _slice_metrics(volume: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """RMSE and PSNR (dB) on the central axial slice ``[:, ny // 2, :]`` (perpendicular to y)."""
    j = volume.shape[1] // 2
    ref = reference[:, j, :].astype(np.float64)
    rmse = float(np.sqrt(np.mean((volume[:, j, :].astype(np.float64) - ref) ** 2)))
    return rmse, float(20.0 * np.log10((ref.max() - ref.min()) / rmse))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="volume voxels per side (default 128)")
    parser.add_argument("--projections", type=int, default=360)
    parser.add_argument("--detector", type=int, default=256, help="detector pixels per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=None, help="timed runs (default 3, 1 from 256^3 up)")
    parser.add_argument("--no-rtk", action="store_true", help="skip RTK")
    parser.add_argument("--worker", choices=("ours", "rtk"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = (_worker_ours if args.worker == "ours" else _worker_rtk)(args)
        print(json.dumps(result))
        return

    big = args.size >= 256
    if args.runs is None:
        args.runs = 1 if big else 3
    args.warmup = not big or args.runs > 1
    sys.path.insert(0, str(ROOT))
    import torch

    from reconstruct.geometry import ConeBeamGeometry, VolumeGrid, write_rtk_geometry_xml
    from reconstruct.phantom import project_ellipsoids, shepp_logan_3d, voxelize_ellipsoids

    rtk_python = None if args.no_rtk else _rtk_python()
    geometry = ConeBeamGeometry.circular(
        args.projections, source_to_isocenter_mm=SID_MM, source_to_detector_mm=SDD_MM,
        detector_size_uv=args.detector, detector_spacing_uv_mm=DETECTOR_MM / args.detector,
    )
    grid = VolumeGrid(args.size, FOV_MM / args.size)
    phantom = shepp_logan_3d(PHANTOM_RADIUS_MM, density_scale=DENSITY_SCALE)
    timing = f"median of {args.runs} after 1 warm-up" if args.warmup else f"{args.runs} run(s), no warm-up"
    print(f"# {args.size}^3 voxels of {FOV_MM / args.size:.4g} mm, {args.projections} projections of "
          f"{args.detector}x{args.detector}, {args.threads} threads, wall s = {timing}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-fdk-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        np.save(work / "projections.npy", project_ellipsoids(phantom, geometry))
        write_rtk_geometry_xml(geometry, work / "geometry.xml")
        reference = voxelize_ellipsoids(phantom, grid)
        print(f"# phantom projections + reference volume: {time.perf_counter() - start:.1f} s", flush=True)

        runs = [("ours", "cpu", sys.executable)]
        if torch.cuda.is_available():
            runs.append(("ours", "cuda", sys.executable))
        if rtk_python is not None:
            runs.append(("rtk", "cpu", rtk_python))
        rows = []
        for method, device, python in runs:
            stats = _spawn(python, method, args, work, device)
            volume = np.load(work / (f"ours-{device}.npy" if method == "ours" else "rtk.npy"))
            rows.append((method, device, stats, volume))
        rtk_volume = next((v for m, _, _, v in rows if m == "rtk"), None)

        header = f"{'method':<8} {'device':<6} {'threads':>7} {'wall s':>8} {'peak RSS MiB':>12} " \
                 f"{'RMSE 1/mm':>10} {'PSNR dB':>8} {'max|ours-RTK|':>14}"
        print(header)
        print("-" * len(header))
        for method, device, stats, volume in rows:
            rmse, psnr = _slice_metrics(volume, reference)
            diff = "-" if rtk_volume is None or method == "rtk" else \
                f"{float(np.abs(volume.astype(np.float64) - rtk_volume).max()):.3e}"
            name = "RTK" if method == "rtk" else "ours"
            print(f"{name:<8} {device:<6} {stats['threads']:>7} {stats['seconds']:>8.2f} {stats['peak_rss_mib']:>12.0f} "
                  f"{rmse:>10.3e} {psnr:>8.2f} {diff:>14}")


if __name__ == "__main__":
    main()
