"""Benchmark our FDK (``reconstruct.fdk.fdk``) against RTK's FDK on Shepp-Logan.

    .venv/bin/python bench/fdk.py --case 128|256|512 [--threads 2] [--rtk-512]
    .venv/bin/python bench/fdk.py [--size 128] [--projections 360] [--detector 256] [--threads 2]

``--case N`` is an N^3 volume from 180 / 360 / 720 projections (N = 128 /
256 / 512) of an N x N detector; the explicit options override it.  At 512
RTK runs only with ``--rtk-512`` (about 13 minutes on a 2-core machine).

1. Exact cone-beam line integrals of the 3D Shepp-Logan phantom
   (``reconstruct.phantom``) for a circular orbit (SID 1000 mm, SDD 1500 mm,
   a 400 mm detector, i.e. a 250 mm field of view at the isocentre) are
   saved to a temporary ``.npy`` together with the RTK geometry XML that
   ``reconstruct.geometry.write_rtk_geometry_xml`` writes.
2. Every measurement runs in its own fresh process (so its peak RSS is its
   own): ours on CPU (and on CUDA when torch sees a GPU) with this
   interpreter, RTK's ``FDKConeBeamReconstructionFilter`` with an interpreter
   that has ``itk-rtk``: this one if ``import itk`` works, else the venv
   ``.stack/bench-rtk`` (created and ``pip install itk-rtk``'d when missing).
   Both use ``--threads`` threads (``torch.set_num_threads`` / ITK's global
   default number of threads, and OMP/MKL/ITK environment variables) and
   ``OMP_WAIT_POLICY=PASSIVE`` unless it is set (see ``_spawn``).
3. Reconstruction: ``--runs`` processes per method (default 3, 1 at 512^3),
   each importing its library, reading the projections, reconstructing once
   (no warm-up) and writing the volume as ``.npy``.  The parent times each
   process from spawn to exit (**whole process**); the process times its
   reconstruction call (**recon**).  Both are medians over the processes.
4. Filter alone, in one more process per method: ours is
   ``reconstruct.fdk.filter_projections`` (cosine/angular/Parker weights +
   ramp filter) over all projections in the chunks ``fdk`` uses (8), each
   chunk copied from the array as ``fdk`` does, no backprojection; RTK's is
   ``FDKWeightProjectionFilter`` (the cosine/angular weighting its FDK
   applies) followed by ``FFTRampImageFilter`` (plain Ram-Lak, as in its
   FDK) on the whole projection stack in one pipeline update.  Median of
   ``--filter-runs`` after one warm-up (default 3; 1 without warm-up at 512).
5. One table: recon s, whole-process s, filter s, GUPS
   (nx * ny * nz * projections / recon s / 1e9), peak RSS (largest over the
   reconstruction processes), RMSE and PSNR against the voxelised phantom on
   the central axial slice (perpendicular to the rotation axis y:
   ``volume[:, ny // 2, :]``), and the max abs difference to RTK's volume.
   Rows are also printed as each method finishes.

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
CHUNK = 8  # projections per chunk: fdk's default, used by the filter-alone timing too
# --case N: N^3 voxels from PROJECTIONS projections of N x N pixels.
CASES = {128: 180, 256: 360, 512: 720}


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
    """Run ``reconstruct.fdk.fdk`` (or, with ``--filter-only``, its weighting + ramp filter alone)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from reconstruct.fdk import fdk
    from reconstruct.fdk.core import check_fdk_inputs, filter_projections
    from reconstruct.fdk.weighting import angular_gaps
    from reconstruct.geometry import VolumeGrid, read_rtk_geometry_xml

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    projections = np.load(work / "projections.npy")
    geometry = read_rtk_geometry_xml(work / "geometry.xml", detector_size_uv=(args.detector, args.detector),
                                     detector_spacing_uv_mm=(DETECTOR_MM / args.detector,) * 2)
    grid = VolumeGrid(args.size, FOV_MM / args.size)
    cuda = args.device.startswith("cuda")

    if args.filter_only:
        scan = check_fdk_inputs(geometry, grid)
        gaps = angular_gaps(geometry.angles_rad)
        n = geometry.n_projections

        def run_filter():  # fdk's loop (chunk 8) without the backprojection
            with torch.no_grad():
                for start in range(0, n, CHUNK):
                    idx = slice(start, min(n, start + CHUNK))
                    block = torch.from_numpy(np.array(projections[idx], dtype=np.float32)).to(args.device)
                    filter_projections(block, geometry, idx, gaps=gaps, short_scan=scan)
            if cuda:
                torch.cuda.synchronize()

        seconds, _ = _timed(run_filter, args.runs, args.warmup)
        return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads()}

    start = time.perf_counter()
    volume = fdk(projections, geometry, grid, device=args.device, chunk=CHUNK)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(work / f"ours-{args.device}.npy", volume)
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads()}


def _worker_rtk(args: argparse.Namespace) -> dict:
    """Run RTK's FDK (or, with ``--filter-only``, its weighting + ramp filter alone); numpy and itk-rtk only."""
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
    threads = int(itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads())

    if args.filter_only:
        def run_filter():  # what FDKConeBeamReconstructionFilter does before backprojecting
            weight = rtk.FDKWeightProjectionFilter[image_type].New()
            weight.SetInput(projections)
            weight.InPlaceOff()  # in place it would take over the stack's buffer (the FDK's own runs on a copy)
            weight.SetGeometry(geometry)
            ramp = rtk.FFTRampImageFilter[image_type, image_type, itk.D].New()
            ramp.SetInput(weight.GetOutput())
            ramp.SetTruncationCorrection(0.0)  # plain Ram-Lak, as in the reconstruction
            ramp.SetHannCutFrequency(0.0)
            ramp.Update()
            return ramp.GetOutput()

        seconds, _ = _timed(run_filter, args.runs, args.warmup)
        return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "threads": threads}

    start = time.perf_counter()
    fdk = rtk.FDKConeBeamReconstructionFilter[image_type].New()
    fdk.SetInput(0, source.GetOutput())
    fdk.SetInput(1, projections)
    fdk.SetGeometry(geometry)
    fdk.GetRampFilter().SetTruncationCorrection(0.0)  # plain Ram-Lak, as ours
    fdk.GetRampFilter().SetHannCutFrequency(0.0)
    fdk.Update()
    volume = itk.array_from_image(fdk.GetOutput())
    seconds = time.perf_counter() - start
    np.save(work / "rtk.npy", volume.astype(np.float32))
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "threads": threads}


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


def _spawn(python: str, method: str, args: argparse.Namespace, work: Path, device: str = "cpu",
           filter_only: bool = False) -> dict:
    """Run one worker process; adds ``process_seconds``: spawn to exit, timed here."""
    runs = args.filter_runs if filter_only else 1
    warmup = filter_only and args.filter_warmup
    cmd = [python, str(Path(__file__).resolve()), "--worker", method, "--work", str(work), "--device", device,
           "--size", str(args.size), "--projections", str(args.projections), "--detector", str(args.detector),
           "--threads", str(args.threads), "--runs", str(runs)] + (["--warmup"] if warmup else []) \
        + (["--filter-only"] if filter_only else [])
    # Same thread count for every library underneath (OpenMP, MKL, ITK).  OpenMP threads wait passively
    # (unless OMP_WAIT_POLICY is set): spin-waiting at every parallel region made torch's 2 threads about
    # 10x slower on a 2-core machine that other processes also load (fdk at 128^3: 24-40 s against 2.3-3.4 s).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{method} worker failed with exit status {out.returncode}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), process_seconds=seconds)


def _measure(python: str, method: str, args: argparse.Namespace, work: Path, device: str) -> dict:
    """``args.runs`` one-shot reconstruction processes, then one filter-alone process."""
    recon = [_spawn(python, method, args, work, device) for _ in range(args.runs)]
    filt = _spawn(python, method, args, work, device, filter_only=True)
    return {
        "recon_s": statistics.median(r["seconds"] for r in recon),
        "process_s": statistics.median(r["process_seconds"] for r in recon),
        "filter_s": filt["seconds"],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in recon),
        "threads": recon[0]["threads"],
    }


def _slice_metrics(volume: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """RMSE and PSNR (dB) on the central axial slice ``[:, ny // 2, :]`` (perpendicular to y)."""
    j = volume.shape[1] // 2
    ref = reference[:, j, :].astype(np.float64)
    rmse = float(np.sqrt(np.mean((volume[:, j, :].astype(np.float64) - ref) ** 2)))
    return rmse, float(20.0 * np.log10((ref.max() - ref.min()) / rmse))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=int, choices=sorted(CASES),
                        help="N^3 from 180/360/720 projections of N^2 for N = 128/256/512")
    parser.add_argument("--size", type=int, default=None, help="volume voxels per side (default 128)")
    parser.add_argument("--projections", type=int, default=None, help="default 360")
    parser.add_argument("--detector", type=int, default=None, help="detector pixels per side (default 256)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=None,
                        help="reconstruction processes per method (default 3, 1 from 512^3 up)")
    parser.add_argument("--filter-runs", type=int, default=None,
                        help="timed filter-alone runs after one warm-up (default 3; 1 without warm-up from 512^3 up)")
    parser.add_argument("--no-rtk", action="store_true", help="skip RTK")
    parser.add_argument("--rtk-512", action="store_true", help="run RTK from 512^3 up too (about 13 min)")
    parser.add_argument("--worker", choices=("ours", "rtk"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--filter-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.runs = args.runs or 1
        result = (_worker_ours if args.worker == "ours" else _worker_rtk)(args)
        print(json.dumps(result))
        return

    preset = (args.case, CASES[args.case], args.case) if args.case else (128, 360, 256)
    args.size = args.size or preset[0]
    args.projections = args.projections or preset[1]
    args.detector = args.detector or preset[2]
    big = args.size >= 512
    if args.runs is None:
        args.runs = 1 if big else 3
    if args.filter_runs is None:
        args.filter_runs = 1 if big else 3
    args.filter_warmup = args.filter_runs > 1
    skip_rtk = None
    if args.no_rtk:
        skip_rtk = "RTK not run (--no-rtk)"
    elif big and not args.rtk_512:
        skip_rtk = "RTK not run at 512 (≈13 min per the calibration); --rtk-512 runs it"
    sys.path.insert(0, str(ROOT))
    import torch

    from reconstruct.geometry import ConeBeamGeometry, VolumeGrid, write_rtk_geometry_xml
    from reconstruct.phantom import project_ellipsoids, shepp_logan_3d, voxelize_ellipsoids

    rtk_python = None if skip_rtk else _rtk_python()
    geometry = ConeBeamGeometry.circular(
        args.projections, source_to_isocenter_mm=SID_MM, source_to_detector_mm=SDD_MM,
        detector_size_uv=args.detector, detector_spacing_uv_mm=DETECTOR_MM / args.detector,
    )
    grid = VolumeGrid(args.size, FOV_MM / args.size)
    phantom = shepp_logan_3d(PHANTOM_RADIUS_MM, density_scale=DENSITY_SCALE)
    filter_timing = f"median of {args.filter_runs} after 1 warm-up" if args.filter_warmup \
        else f"{args.filter_runs} run(s), no warm-up"
    print(f"# {args.size}^3 voxels of {FOV_MM / args.size:.4g} mm, {args.projections} projections of "
          f"{args.detector}x{args.detector}, {args.threads} threads; recon s and whole-process s: median of "
          f"{args.runs} fresh process(es), one reconstruction each, no warm-up; filter s: {filter_timing}; "
          f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

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
        header = f"{'method':<6} {'device':<6} {'thr':>3} {'recon s':>8} {'process s':>9} {'filter s':>8} " \
                 f"{'GUPS':>7} {'peak RSS MiB':>12} {'RMSE 1/mm':>10} {'PSNR dB':>8} {'max|ours-RTK|':>14}"
        updates = args.size ** 3 * args.projections / 1e9

        def line(method, device, stats, volume, rtk_volume):
            rmse, psnr = _slice_metrics(volume, reference)
            diff = "-" if rtk_volume is None or method == "rtk" else \
                f"{float(np.abs(volume.astype(np.float64) - rtk_volume).max()):.3e}"
            name = "RTK" if method == "rtk" else "ours"
            return (f"{name:<6} {device:<6} {stats['threads']:>3} {stats['recon_s']:>8.2f} {stats['process_s']:>9.2f} "
                    f"{stats['filter_s']:>8.2f} {updates / stats['recon_s']:>7.3f} {stats['peak_rss_mib']:>12.0f} "
                    f"{rmse:>10.3e} {psnr:>8.2f} {diff:>14}")

        rows = []
        for method, device, python in runs:
            stats = _measure(python, method, args, work, device)
            volume = np.load(work / (f"ours-{device}.npy" if method == "ours" else "rtk.npy"))
            rows.append((method, device, stats, volume))
            print(f"# done {time.strftime('%H:%M:%S')}, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}: {line(method, device, stats, volume, None)}",
                  flush=True)
        rtk_volume = next((v for m, _, _, v in rows if m == "rtk"), None)

        print(header)
        print("-" * len(header))
        for method, device, stats, volume in rows:
            print(line(method, device, stats, volume, rtk_volume))
        if skip_rtk:
            print(skip_rtk)


if __name__ == "__main__":
    main()
