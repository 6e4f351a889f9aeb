"""FDK of a stored projection series: in this process vs Spark standalone with 1 and 2 Workers.

    .venv/bin/python bench/fdk_spark.py [--size 256] [--projections 360] [--detector 256] [--runs 3]

1. Exact cone-beam line integrals of the 3D Shepp-Logan head (SID 1000 mm,
   SDD 1500 mm, a 400 mm detector: the geometry of ``bench/fdk.py``) are
   stored as one multi-frame projection instance in a fresh embedded archive
   (local files + SQLite) under a temporary folder.
2. Driver processes, each kept alive for the whole benchmark:
   ``reconstruct.jobs.archive.reconstruct_series`` in its own process, once
   per ``--threads`` count (torch threads: 1 and 2 by default), and
   ``reconstruct.jobs.spark.reconstruct_series_spark`` with one SparkSession
   against each of two standalone clusters started with ``deploy/spark.sh up``
   (``PACS_SPARK_WORKERS=1`` and ``=2``, 1 core and 2 GiB per Worker, each on
   its own ports and folder, so a cluster of the developer's stays untouched).
   Spark runs one task per slab with torch limited to the task's core.
3. Every configuration runs once cold (not in the medians: the first Spark
   job also starts the executors' Python workers and imports torch there),
   then ``--runs`` rounds run the configurations one after the other,
   the order rotating each round, so that a change of the machine's load
   during the benchmark hits all of them alike.  Each run reads the series
   from the archive, reconstructs and stores a new CT series.
4. The table gives the median wall seconds of the reconstruction phase (for
   Spark: cutting the bands, the job, and assembling the volume on the
   driver) and of the whole job (read + reconstruct + store), the speedup
   from 1 to 2 Workers (of the medians, and round by round), and how far the
   last stored Spark volumes are from the in-process one (HU).
   On a loaded machine, torch's multi-threaded loops slow down far more than
   single-threaded ones (a thread that is descheduled holds up the others
   at every barrier), hence the 1-thread in-process reference too.

The load average after each run is printed too: other work on the machine
slows the figures down.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPARK_SH = ROOT / "deploy" / "spark.sh"
SID_MM, SDD_MM, DETECTOR_MM, FOV_MM = 1000.0, 1500.0, 400.0, 250.0
PHANTOM_RADIUS_MM, DENSITY_SCALE = 110.0, 0.0195


def _services(data_dir: str):
    from pacs.services import build_services
    from pacs.settings import Settings

    return build_services(Settings(data_dir=Path(data_dir)))


# ---------------------------------------------------------------- driver processes
def _worker(args: argparse.Namespace) -> None:
    """One configuration, kept alive: a line ``run`` on stdin -> one run, its phases as a JSON line."""
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    torch.set_num_threads(int(args.threads))
    shape = dict(dimension=args.size, spacing=FOV_MM / args.size, filter="hann", device="cpu")
    with _services(args.data_dir) as services:
        if args.worker == "in-process":
            from reconstruct.jobs.archive import reconstruct_series

            def run():
                return reconstruct_series(services, args.series, **shape)

            ready = {}
        else:
            from pacs.spark import build_spark_session
            from reconstruct.jobs.spark import reconstruct_series_spark

            started = time.perf_counter()
            spark = build_spark_session(args.master, "bench fdk_spark", settings=services.settings.spark)
            spark.sparkContext.parallelize([0]).count()  # the application has its executors
            ready = {"spark_start_s": time.perf_counter() - started}

            def run():
                return reconstruct_series_spark(services, args.series, spark=spark, slabs=args.slabs, **shape)

        print(json.dumps(ready), flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            started = time.perf_counter()
            result = run()
            total = time.perf_counter() - started
            print(json.dumps({"total_s": total, "series": result.series_instance_uid, "slabs": result.slabs,
                              **{k: float(v) for k, v in result.phases_s.items()}}), flush=True)


class _Driver:
    """A worker process of this script, one configuration, driven over stdin/stdout."""

    def __init__(self, args: argparse.Namespace, kind: str, data_dir: str, series: str, master: str | None = None,
                 threads: int = 1):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--data-dir", data_dir,
               "--series", series, "--size", str(args.size), "--threads", str(threads)]
        if master:
            cmd += ["--master", master]
        if args.slabs:
            cmd += ["--slabs", str(args.slabs)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
        env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, OMP_NUM_THREADS=str(threads))
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()
        self.runs: list[dict] = []

    def _read(self) -> dict:
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"benchmark worker exited with {self.process.wait()}")
        return json.loads(line)

    def run(self) -> dict:
        self.process.stdin.write("run\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        result = self._read()
        result["load"] = os.getloadavg()[0]
        self.runs.append(result)
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")  # type: ignore[union-attr]
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=120)


# ---------------------------------------------------------------- clusters
def _cluster_env(workers: int, stack_dir: Path) -> dict[str, str]:
    """deploy/spark.sh settings of the bench's cluster with ``workers`` Workers (own ports and folder)."""
    base = 17000 + 200 * workers  # 17200/18200.. for 1 worker, 17400/18400.. for 2: clear of the default cluster
    return dict(os.environ, PACS_STACK_DIR=str(stack_dir / f"{workers}w"), PACS_SPARK_WORKERS=str(workers),
                PACS_SPARK_MASTER_PORT=str(base + 77), PACS_SPARK_UI_PORT=str(base + 1080),
                PACS_SPARK_WORKER_UI_PORT=str(base + 1081), PACS_SPARK_WORKER_CORES="1",
                PACS_SPARK_WORKER_MEMORY="2g")


def _spark_sh(command: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", str(SPARK_SH), command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"deploy/spark.sh {command} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _stored_hu(data_dir: str, series_uid: str) -> np.ndarray:
    import pydicom
    from sqlalchemy import select

    from pacs.index.models import Instance, Series
    from pacs.index.repository import LOCATION_COLUMNS, location_of

    with _services(data_dir) as services, services.db.session() as session:
        rows = session.execute(
            select(*LOCATION_COLUMNS)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.series_instance_uid == series_uid).order_by(Instance.instance_number)).all()
        slices = [pydicom.dcmread(io.BytesIO(services.objects.get(location_of(row)))) for row in rows]
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="volume voxels per side (default 256)")
    parser.add_argument("--projections", type=int, default=360)
    parser.add_argument("--detector", type=int, default=256, help="detector pixels per side")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds after the cold runs (default 3)")
    parser.add_argument("--threads", default="1,2", help="torch threads of the in-process references (default 1,2)")
    parser.add_argument("--slabs", type=int, help="slabs (default: the job's, max(2, parallelism))")
    parser.add_argument("--worker", choices=("in-process", "spark"), help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--series", help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return

    from reconstruct.dicom_io import projections_to_multiframe
    from reconstruct.geometry import ConeBeamGeometry, VolumeGrid
    from reconstruct.jobs.spark import plan_slabs
    from reconstruct.phantom import project_ellipsoids, shepp_logan_3d

    threads = [int(t) for t in args.threads.split(",")]
    geometry = ConeBeamGeometry.circular(args.projections, source_to_isocenter_mm=SID_MM,
                                         source_to_detector_mm=SDD_MM, detector_size_uv=args.detector,
                                         detector_spacing_uv_mm=DETECTOR_MM / args.detector)
    grid = VolumeGrid(args.size, FOV_MM / args.size)
    with tempfile.TemporaryDirectory(prefix="bench-fdk-spark-") as work:
        data_dir = str(Path(work) / "data")
        print(f"projecting {args.projections} views of {args.detector}^2 ...", file=sys.stderr, flush=True)
        projections = project_ellipsoids(shepp_logan_3d(PHANTOM_RADIUS_MM, density_scale=DENSITY_SCALE), geometry)
        buffer = io.BytesIO()
        projections_to_multiframe(projections, geometry).save_as(buffer, enforce_file_format=True)
        with _services(data_dir) as services:
            series = services.ingest.store(buffer.getvalue()).series_instance_uid
        del buffer, projections

        clusters = {n: _cluster_env(n, Path(work) / "stack") for n in (1, 2)}
        drivers: dict[str, _Driver] = {}
        try:
            for n, env in clusters.items():
                print(f"deploy/spark.sh up with PACS_SPARK_WORKERS={n} ...", file=sys.stderr, flush=True)
                _spark_sh("up", env)
            print("starting the drivers and their cold runs ...", file=sys.stderr, flush=True)
            for t in threads:
                drivers[f"in-process, {t} torch thread{'s' if t > 1 else ''}"] = _Driver(
                    args, "in-process", data_dir, series, threads=t)
            for n, env in clusters.items():
                master = _spark_sh("env", env).splitlines()[0].split("=", 1)[1]
                drivers[f"Spark standalone, {n} worker{'s' if n > 1 else ''} x 1 core"] = _Driver(
                    args, "spark", data_dir, series, master)
            for driver in drivers.values():
                driver.run()  # cold: not in the medians
            names = list(drivers)
            for round_ in range(args.runs):  # interleaved, the order rotating, so load changes hit all alike
                order = names[round_ % len(names):] + names[:round_ % len(names)]
                for name in order:
                    print(f"round {round_ + 1}/{args.runs}: {name}", file=sys.stderr, flush=True)
                    drivers[name].run()
        finally:
            for driver in drivers.values():
                driver.close()
            for env in clusters.values():
                _spark_sh("down", env)

        names = list(drivers)
        reference = _stored_hu(data_dir, drivers[names[0]].runs[-1]["series"])
        hu_diff = {name: float(np.abs(_stored_hu(data_dir, drivers[name].runs[-1]["series"]) - reference).max())
                   for name in names[1:]}

    timed = {name: d.runs[1:] for name, d in drivers.items()}
    one, two = (timed[name] for name in names[-2:])
    slabs = drivers[names[-1]].runs[-1]["slabs"]
    plan = plan_slabs(geometry, grid, slabs)
    print(f"\nFDK (hann) {args.size}^3 from {args.projections} projections of {args.detector}^2, read from and "
          f"stored into the embedded archive; median of {args.runs} interleaved rounds after one cold run each")
    bands = ", ".join(f"{s.row_stop - s.row_start} rows = {s.band_bytes(geometry) / 2**20:.0f} MiB" for s in plan)
    voxels = ", ".join(f"{4 * args.size * args.size * (s.y_stop - s.y_start) / 2**20:.0f} MiB" for s in plan)
    print(f"{slabs} slabs; per task in: {bands}; out: {voxels}")
    print(f"| configuration | reconstruct s | whole job s | cold run s | Spark start s | "
          f"max abs HU diff to {names[0]} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, driver in drivers.items():
        start = f"{driver.ready['spark_start_s']:.1f}" if "spark_start_s" in driver.ready else ""
        diff = f"{hu_diff[name]:.0f}" if name in hu_diff else ""
        print(f"| {name} | {_median(timed[name], 'reconstruct'):.1f} | {_median(timed[name], 'total_s'):.1f} | "
              f"{driver.runs[0]['total_s']:.1f} | {start} | {diff} |")
    paired = [a["reconstruct"] / b["reconstruct"] for a, b in zip(one, two)]
    paired_whole = [a["total_s"] / b["total_s"] for a, b in zip(one, two)]
    print(f"\nspeedup 1 -> 2 workers: reconstruct {_median(one, 'reconstruct') / _median(two, 'reconstruct'):.2f} "
          f"(per round {', '.join(f'{p:.2f}' for p in paired)}), whole job "
          f"{_median(one, 'total_s') / _median(two, 'total_s'):.2f} "
          f"(per round {', '.join(f'{p:.2f}' for p in paired_whole)})")
    print("\nper run (cold first): reconstruct s / whole s / load average after")
    for name, driver in drivers.items():
        print(f"  {name}: " + "; ".join(f"{r['reconstruct']:.1f} / {r['total_s']:.1f} / {r['load']:.1f}"
                                        for r in driver.runs))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
