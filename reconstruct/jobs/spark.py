"""FDK of a stored projection series on Spark, in slabs along the rotation axis.

The volume ``[z, y, x]`` is cut into slabs of y rows (y is the rotation
axis).  A slab ``volume[:, y0:y1, :]`` only sees the detector rows
``slab_rows(geometry, grid, (y0, y1)) = (r0, r1)``, and reconstructing it
from ``projections[:, r0:r1, :]`` with ``geometry.with_detector_rows(r0, r1)``
and ``grid.y_slab(y0, y1)`` gives the voxels of the full reconstruction
(weights, the ramp filter along u and the bilinear backprojection only ever
combine pixels of one row band).  So:

1. the driver reads the series once (:func:`~reconstruct.jobs.archive.read_projection_series`),
   plans the slabs and cuts each one's band of rows out of the projections;
2. each Spark task receives one row ``(slab, y0, y1, r0, r1, band bytes)``
   (the band only, float32 ``[angle, r1 - r0, u]``) with the geometry and grid
   as JSON, runs :func:`reconstruct.fdk.fdk` on it with torch limited to the
   task's cores, and returns the slab's voxels (float32 ``[z, y1 - y0, x]``);
3. the driver assembles the volume and stores it as a derived CT series
   through ingest (:func:`~reconstruct.jobs.archive.store_volume`), like the
   in-process job.

Slabs whose rows miss the detector (``slab_rows`` gives ``(0, 0)``) are zero
and not sent anywhere.

Run it with ``pacs reconstruct SERIES_UID --master local[*]|spark://HOST:PORT``,
or with spark-submit (the driver reads the archive, so it runs where the
archive's settings point)::

    PYSPARK_PYTHON=.venv/bin/python $SPARK_HOME/bin/spark-submit \\
        --master spark://127.0.0.1:17077 reconstruct/jobs/spark.py SERIES_UID \\
        --data-dir pacs-data --dimension 256 --spacing 1 --filter hann
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from reconstruct.geometry import ConeBeamGeometry, VolumeGrid

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pacs.services import Services
    from pacs.settings import SparkSettings
    from reconstruct.jobs.archive import ReconstructionResult

__all__ = [
    "Slab",
    "plan_slabs",
    "default_slab_count",
    "reconstruct_slab",
    "reconstruct_volume_spark",
    "reconstruct_series_spark",
    "main",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

# Room left in a task message for everything but the band (pickled closure, geometry JSON).
_TASK_OVERHEAD_MB = 2.0


@dataclass(frozen=True)
class Slab:
    """``volume[:, y_start:y_stop, :]`` and the detector rows ``[row_start, row_stop)`` it needs.

    ``row_start == row_stop == 0`` when the slab misses the detector.
    """

    index: int
    y_start: int
    y_stop: int
    row_start: int
    row_stop: int

    @property
    def misses_detector(self) -> bool:
        return self.row_stop <= self.row_start

    def band_bytes(self, geometry: ConeBeamGeometry) -> int:
        """Size of its float32 band of projection rows."""
        n, _, nu = geometry.projection_shape
        return 4 * n * nu * (self.row_stop - self.row_start)


def plan_slabs(geometry: ConeBeamGeometry, grid: VolumeGrid, count: int) -> list[Slab]:
    """``count`` slabs of y rows as even as possible (at least one row each; at most ny slabs)."""
    from reconstruct.fdk import slab_rows

    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"slabs: expected a positive integer, got {count!r}")
    ny = grid.dimension_xyz[1]
    count = min(int(count), ny)
    bounds = [i * ny // count for i in range(count + 1)]
    slabs = []
    for index, (y0, y1) in enumerate(zip(bounds[:-1], bounds[1:])):
        r0, r1 = slab_rows(geometry, grid, (y0, y1))
        slabs.append(Slab(index, y0, y1, r0, r1))
    return slabs


def default_slab_count(geometry: ConeBeamGeometry, grid: VolumeGrid, parallelism: int,
                       max_band_mb: float) -> int:
    """At least ``max(2, parallelism)`` slabs, more while a band exceeds ``max_band_mb``."""
    ny = grid.dimension_xyz[1]
    count = min(ny, max(2, int(parallelism)))
    while count < ny and max(s.band_bytes(geometry) for s in plan_slabs(geometry, grid, count)) > max_band_mb * 2**20:
        count = min(ny, max(count + 1, math.ceil(count * 1.25)))
    return count


def reconstruct_slab(
    band: np.ndarray,
    geometry: ConeBeamGeometry,
    grid: VolumeGrid,
    slab: Slab,
    *,
    filter: str = "ram-lak",
    device: str = "cpu",
) -> np.ndarray:
    """FDK of one slab from its band ``projections[:, row_start:row_stop, :]``.

    ``geometry`` and ``grid`` describe the whole acquisition and volume.
    Returns float32 ``[nz, y_stop - y_start, nx]``, equal to
    ``fdk(projections, geometry, grid)[:, y_start:y_stop, :]`` to float rounding.
    """
    from reconstruct.fdk import fdk

    sub_grid = grid.y_slab(slab.y_start, slab.y_stop)
    if slab.misses_detector:
        return np.zeros(sub_grid.shape, dtype=np.float32)
    sub_geometry = geometry.with_detector_rows(slab.row_start, slab.row_stop)
    return fdk(band, sub_geometry, sub_grid, filter=filter, device=device)


def _slab_task(
    rows: Iterable[tuple[int, int, int, int, int, bytes]],
    *,
    geometry_json: str,
    grid: dict,
    filter: str,
    device: str,
) -> Iterator[tuple[int, bytes]]:
    """Executor side: ``(slab, y0, y1, r0, r1, band)`` rows -> ``(slab, voxels)`` float32 bytes."""
    import torch
    from pyspark import TaskContext

    context = TaskContext.get()
    torch.set_num_threads(max(1, context.cpus() if context is not None else 1))
    geometry = ConeBeamGeometry.from_json(geometry_json)
    volume_grid = VolumeGrid.from_dict(grid)
    n, _, nu = geometry.projection_shape
    for index, y0, y1, r0, r1, band in rows:
        slab = Slab(index, y0, y1, r0, r1)
        projections = np.frombuffer(band, dtype=np.float32).reshape(n, r1 - r0, nu)
        voxels = reconstruct_slab(projections, geometry, volume_grid, slab, filter=filter, device=device)
        yield index, np.ascontiguousarray(voxels, dtype=np.float32).tobytes()


def reconstruct_volume_spark(
    spark: SparkSession,
    projections: np.ndarray,
    geometry: ConeBeamGeometry,
    grid: VolumeGrid,
    *,
    filter: str = "ram-lak",
    device: str = "cpu",
    slabs: int | None = None,
    max_task_mb: float = 256.0,
    progress: ProgressCallback | None = None,
    description: str = "FDK",
) -> tuple[np.ndarray, list[Slab]]:
    """FDK of a projection stack ``[angle, v, u]`` on Spark, one task per slab.

    ``slabs=None`` picks :func:`default_slab_count` (``max(2, default
    parallelism)``, more if a band would not fit in ``max_task_mb``).
    ``progress(done, total)`` counts finished slab tasks.  Returns the volume
    ``[z, y, x]`` float32 (as :func:`reconstruct.fdk.fdk`) and the slab plan.
    """
    from pacs.errors import JobFailed
    from pacs.spark import job_progress, task_error_message
    from reconstruct.fdk import check_fdk_inputs

    if tuple(projections.shape) != geometry.projection_shape:
        raise ValueError(f"projections: expected shape {geometry.projection_shape} [angle, v, u] from the geometry, "
                         f"got {tuple(projections.shape)}")
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'auto', got {device!r}")
    check_fdk_inputs(geometry, grid, filter=filter)
    sc = spark.sparkContext
    budget_mb = max_task_mb - _TASK_OVERHEAD_MB
    count = slabs if slabs is not None else default_slab_count(geometry, grid, sc.defaultParallelism, budget_mb)
    plan = plan_slabs(geometry, grid, count)
    for slab in plan:
        if slab.band_bytes(geometry) > budget_mb * 2**20:
            raise ValueError(
                f"slabs: slab {slab.index} needs {slab.band_bytes(geometry) / 2**20:.0f} MiB of projection rows, "
                f"more than a task may carry ({budget_mb:.0f} MiB of spark.max_task_mb {max_task_mb:g}); "
                f"use more slabs"
            )
    work = [s for s in plan if not s.misses_detector]
    volume = np.zeros(grid.shape, dtype=np.float32)
    log.info("%s: %d slabs of y (%d miss the detector) on %s", description, len(plan), len(plan) - len(work),
             sc.master)
    if not work:
        return volume, plan
    rows = [(s.index, s.y_start, s.y_stop, s.row_start, s.row_stop,
             np.ascontiguousarray(projections[:, s.row_start:s.row_stop, :], dtype=np.float32).tobytes())
            for s in work]
    task = functools.partial(_slab_task, geometry_json=geometry.to_json(), grid=grid.to_dict(),
                             filter=filter, device=device)
    with job_progress(sc, progress, description=f"{description}: {len(work)} slabs",
                      expected_tasks=len(work)):
        rdd = sc.parallelize(rows, len(rows)).mapPartitions(task)
        del rows  # the JVM holds the tasks' bands now
        try:
            results = rdd.collect()
        except Exception as exc:  # a task's Python error comes back wrapped by Py4J / pyspark
            raise JobFailed(f"{description} failed on Spark ({sc.master}): {task_error_message(exc)}") from exc
    nz, _, nx = grid.shape
    by_index = {s.index: s for s in work}
    for index, voxels in results:
        slab = by_index[index]
        volume[:, slab.y_start:slab.y_stop, :] = np.frombuffer(voxels, dtype=np.float32).reshape(
            nz, slab.y_stop - slab.y_start, nx)
    return volume, plan


def reconstruct_series_spark(
    services: Services,
    series_instance_uid: str,
    *,
    dimension: int | tuple[int, int, int],
    spacing: float | tuple[float, float, float],
    filter: str = "ram-lak",
    device: str = "cpu",
    master: str | None = None,
    slabs: int | None = None,
    spark: SparkSession | None = None,
    spark_settings: SparkSettings | None = None,
    progress: ProgressCallback | None = None,
) -> ReconstructionResult:
    """FDK of a stored projection series on Spark; the volume is stored as a derived CT series.

    The series is read and checked before Spark starts, so an unknown series
    (``NotFound``) or a bad request (``ValueError``) costs no Spark start-up
    and stores nothing.  ``spark`` reuses a running session; otherwise one is
    started for ``master`` (``None``: the settings' ``spark.master``, or the
    one spark-submit chose) and stopped at the end.
    """
    from pacs.spark import launched_by_spark_submit, spark_session
    from reconstruct.fdk import check_fdk_inputs
    from reconstruct.jobs.archive import read_projection_series, store_volume

    spark_settings = spark_settings or services.settings.spark
    if master is None and spark is None and not launched_by_spark_submit():
        master = spark_settings.master
    started = time.perf_counter()
    series = read_projection_series(services, series_instance_uid)
    grid = VolumeGrid(dimension, spacing)
    check_fdk_inputs(series.geometry, grid, filter=filter)
    if slabs is not None:
        plan_slabs(series.geometry, grid, slabs)  # validates the count before Spark starts

    phases = {"read": time.perf_counter() - started}

    def run(session: SparkSession) -> tuple[np.ndarray, list[Slab], str]:
        begun = time.perf_counter()
        volume, plan = reconstruct_volume_spark(
            session, series.projections, series.geometry, grid, filter=filter, device=device, slabs=slabs,
            max_task_mb=spark_settings.max_task_mb, progress=progress, description=f"FDK {series_instance_uid}")
        phases["reconstruct"] = time.perf_counter() - begun
        return volume, plan, session.sparkContext.master

    if spark is not None:
        volume, plan, where = run(spark)
    else:
        begun = time.perf_counter()
        with spark_session(master, f"pacs FDK {series_instance_uid}", settings=spark_settings) as session:
            phases["spark start"] = time.perf_counter() - begun
            volume, plan, where = run(session)
    log.info("series %s reconstructed in %d slabs on %s in %.1f s", series_instance_uid, len(plan), where,
             phases["reconstruct"])
    result = store_volume(services, volume, grid, series, filter=filter, phases_s=phases)
    return dataclasses.replace(result, spark_master=where, slabs=len(plan))


# ---------------------------------------------------------------- spark-submit entry
def _numbers(text: str, what: str, counts: tuple[int, ...]) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if len(values) not in counts:
        raise ValueError(f"{what}: expected {' or '.join(map(str, counts))} values, got {text!r}")
    return values


def _print_progress() -> ProgressCallback:
    def show(done: int, total: int) -> None:
        print(f"slabs {done}/{total}", file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    """``spark-submit [--master URL] reconstruct/jobs/spark.py SERIES_UID [options]``.

    Settings come from ``PACS_*`` variables / ``PACS_CONFIG`` like the
    ``pacs`` command (``--data-dir`` sets ``PACS_DATA_DIR``).  Under
    spark-submit its ``--master`` decides; run with plain ``python`` the
    ``--master`` option or the settings do.  Exit code 0 on success, 1 when
    the job fails or is refused, 2 for bad options.
    """
    parser = argparse.ArgumentParser(
        prog="spark-submit reconstruct/jobs/spark.py",
        description="Reconstruct a stored projection series (FDK) on Spark into a new CT series in the archive.",
    )
    parser.add_argument("series_uid", help="SeriesInstanceUID of a stored projection series")
    parser.add_argument("--data-dir", help="folder of the embedded default (env PACS_DATA_DIR)")
    parser.add_argument("--dimension", default="256", help="volume size in voxels: one value or x,y,z")
    parser.add_argument("--spacing", default="1", help="voxel size in mm: one value or x,y,z")
    parser.add_argument("--filter", default="hann", help="ramp window: ram-lak, shepp-logan, cosine, hamming, hann")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (on the executors)")
    parser.add_argument("--slabs", type=int, help="number of slabs (default: max(2, default parallelism))")
    parser.add_argument("--master", help="when run without spark-submit: local[*], local[N] or spark://HOST:PORT "
                                         "(default: the settings' spark.master)")
    args = parser.parse_args(argv)

    from pacs.errors import PacsError
    from pacs.services import build_services
    from pacs.settings import load_settings

    if args.data_dir:
        os.environ["PACS_DATA_DIR"] = args.data_dir
    try:
        settings = load_settings()
        sizes = [int(v) for v in _numbers(args.dimension, "--dimension", (1, 3))]
        voxel = _numbers(args.spacing, "--spacing", (1, 3))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        with build_services(settings) as services:
            result = reconstruct_series_spark(
                services, args.series_uid, dimension=tuple(sizes) if len(sizes) == 3 else sizes[0],
                spacing=tuple(voxel) if len(voxel) == 3 else voxel[0], filter=args.filter, device=args.device,
                master=args.master, slabs=args.slabs, progress=_print_progress())
    except (PacsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"stored CT series {result.series_instance_uid}: {result.slices} slices "
          f"({result.slabs} slabs on {result.spark_master})")
    return 0


if __name__ == "__main__":  # spark-submit reconstruct/jobs/spark.py ...
    # Run through the package's module so that the functions Spark ships to
    # executors are pickled by reference (reconstruct.jobs.spark), not by value.
    from reconstruct.jobs.spark import main as _main

    sys.exit(_main())
