"""Denoise a stored CT series into a derived CT series in the archive, on Spark or in this process.

Both ways share everything but the execution:

1. the driver reads the series through the index and the object store
   (:func:`read_stored_ct_series`: CT only, every slice with Pixel Data, in
   the order of :func:`denoise.dicom_io.read_ct_series`, as HU);
2. it loads the checkpoint and runs one tile through it
   (:func:`prepare_checkpoint`), so a checkpoint that is missing, not ours or
   whose weights do not fit its network, and bad tiling options, fail before
   Spark starts and before anything is written;
3. the slices are denoised with :func:`denoise.infer.denoise_slices`;
4. only when every slice is done, the derived series is built with
   :func:`denoise.dicom_io.derived_ct_datasets` (new Series Instance UID, the
   source's Frame of Reference and geometry, Series Description naming the
   model version, Derivation Description, Source Image and Referenced Series
   Sequences) and stored through ``services.ingest`` like any C-STORE.

On Spark (:func:`denoise_series`) the checkpoint's bytes are broadcast once
(``sc.broadcast``: each executor fetches them once) and the slices go out as
an RDD of ``(index, HU float32 bytes [H, W])`` rows in ``partitions``
contiguous chunks.  A task (:func:`denoise_partition`) takes one chunk: it
gets the model from a per-Python-worker cache keyed by the checkpoint's
SHA-256 (a reused worker loads it once, not once per task), limits torch to
the task's cores (``spark.task.cpus``, 1 by default), denoises its slices and
returns ``(index, HU float32 bytes)``.  The driver collects every result first,
so a failing task fails the job (:class:`~pacs.errors.JobFailed`) with nothing
stored.

Run it with ``pacs denoise run SERIES_UID [--master local[*]|spark://HOST:PORT]``,
or with spark-submit (the driver reads the archive, so it runs where the
archive's settings point)::

    PYSPARK_PYTHON=.venv/bin/python $SPARK_HOME/bin/spark-submit \\
        --master spark://127.0.0.1:17077 denoise/jobs.py SERIES_UID --data-dir pacs-data
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pyspark import Broadcast
    from pyspark.sql import SparkSession

    from denoise.dicom_io import CtSeries
    from denoise.model import UNet
    from pacs.services import Services
    from pacs.settings import SparkSettings

__all__ = [
    "DenoiseResult",
    "PreparedCheckpoint",
    "TileOptions",
    "read_stored_ct_series",
    "prepare_checkpoint",
    "plan_partitions",
    "denoise_partition",
    "denoise_slices_spark",
    "store_denoised",
    "denoise_series",
    "denoise_series_in_process",
    "main",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

#: Recorded as the derived instances' source in the index.
SOURCE_AE = "DENOISE"
# Room left in a task message for everything but the slices (pickled closure, options).
_TASK_OVERHEAD_MB = 2.0


@dataclass(frozen=True)
class TileOptions:
    """How :func:`denoise.infer.denoise_slices` runs (its keyword arguments of the same names)."""

    tile_px: int = 256
    overlap_px: int = 32
    batch_size: int = 4
    precision: str = "float32"
    ensemble: int = 1

    def as_kwargs(self) -> dict[str, Any]:
        return {"tile_px": self.tile_px, "overlap_px": self.overlap_px, "batch_size": self.batch_size,
                "precision": self.precision, "ensemble": self.ensemble}


def resolved_options(tile_px: int, overlap_px: int, batch_size: int, precision: str, ensemble: int | None,
                     device: str) -> TileOptions:
    """TileOptions with ``precision="auto"`` and ``ensemble=None`` resolved for ``device`` (``denoise.infer``)."""
    from denoise.infer import resolve_ensemble, resolve_precision

    precision = resolve_precision(precision, device)
    return TileOptions(tile_px, overlap_px, batch_size, precision, resolve_ensemble(ensemble, precision))


@dataclass(frozen=True)
class PreparedCheckpoint:
    """A checkpoint checked on the driver: its file's bytes (what tasks receive) and metadata."""

    data: bytes = field(repr=False)
    sha256: str
    name: str  # the file's name, e.g. unet-1.0.pt
    meta: Mapping[str, Any]

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "?"))


@dataclass(frozen=True)
class DenoiseResult:
    source_series_instance_uid: str
    series_instance_uid: str
    slices: int
    model_version: str
    # Wall seconds of each phase: "read" (series and checkpoint), "denoise", "store"
    # (and "spark start" when the job started a Spark session).
    phases_s: Mapping[str, float] = field(default_factory=dict)
    # Where it ran: None in this process; else the Spark master and the number of partitions.
    spark_master: str | None = None
    partitions: int | None = None


# ---------------------------------------------------------------- shared by both ways
def read_stored_ct_series(services: Services, series_instance_uid: str) -> CtSeries:
    """A stored CT series as HU ``[N, H, W]`` float32, slices ordered as ``read_ct_series`` orders files.

    Raises :class:`~pacs.errors.NotFound` for an unknown series and
    :class:`~denoise.dicom_io.DicomInputError` naming the instance for another
    modality, a slice without Pixel Data, several sizes or undecodable pixels.
    The datasets of the result keep their metadata only (Pixel Data is dropped
    once decoded).
    """
    from denoise.dicom_io import ct_series_from_datasets
    from reconstruct.jobs.archive import load_series

    series = ct_series_from_datasets(load_series(services, series_instance_uid))
    for dataset in series.datasets:  # the HU array holds the pixels now
        del dataset.PixelData
    return series


def prepare_checkpoint(model_path: Path | str | None, options: TileOptions) -> tuple[PreparedCheckpoint, UNet]:
    """Load and check a checkpoint (default: the shipped one) and the tiling options, on this process's CPU.

    One tile of zeros goes through the network, so a checkpoint that does not
    load (:class:`~denoise.checkpoints.CheckpointError`) or options it cannot
    run with (``ValueError``, e.g. a tile that is not a multiple of the
    network's ``2**depth``) fail here, before any work is shipped.  float16
    needs CUDA, so it is checked on the device that runs it, not here.
    """
    from denoise.checkpoints import default_checkpoint, load_checkpoint
    from denoise.infer import PRECISIONS, denoise_slices

    path = Path(model_path) if model_path is not None else default_checkpoint()
    net, meta = load_checkpoint(path, device="cpu")
    if options.precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    side = net.config.multiple_px
    dry_run = dataclasses.replace(options, precision="float32") if options.precision == "float16" else options
    denoise_slices(net, np.zeros((side, side), np.float32), device="cpu", **dry_run.as_kwargs())
    data = path.read_bytes()
    return PreparedCheckpoint(data, hashlib.sha256(data).hexdigest(), path.name, meta), net


def _derivation(checkpoint: PreparedCheckpoint, options: TileOptions) -> str:
    return derivation_text(checkpoint.version, checkpoint.name, options)


def derivation_text(version: str, name: str, options: TileOptions) -> str:
    """The DerivationDescription of a denoised series."""
    ensemble = f", self-ensemble of {options.ensemble}" if options.ensemble > 1 else ""
    return (f"Denoised with U-Net unet-{version} ({name}; tiles {options.tile_px} px, "
            f"overlap {options.overlap_px} px, {options.precision}{ensemble})")


def store_denoised(
    services: Services,
    series: CtSeries,
    hu: np.ndarray,
    checkpoint: PreparedCheckpoint,
    options: TileOptions,
    *,
    phases_s: Mapping[str, float] | None = None,
) -> DenoiseResult:
    """Store denoised HU ``[N, H, W]`` (the order of ``series``) as a derived CT series through ingest."""
    from denoise.dicom_io import derived_ct_datasets

    started = time.perf_counter()
    source_uid = str(series.datasets[0].SeriesInstanceUID)
    slices = derived_ct_datasets(series, hu, model_version=checkpoint.version,
                                 derivation=_derivation(checkpoint, options))
    for dataset in slices:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        services.ingest.store(buffer.getvalue(), source_ae=SOURCE_AE)
    phases = {**(phases_s or {}), "store": time.perf_counter() - started}
    log.info("stored CT series %s (%d slices) denoised with unet-%s from series %s", slices[0].SeriesInstanceUID,
             len(slices), checkpoint.version, source_uid)
    return DenoiseResult(source_uid, str(slices[0].SeriesInstanceUID), len(slices), checkpoint.version, phases)


# ---------------------------------------------------------------- in this process
def denoise_series_in_process(
    services: Services,
    series_instance_uid: str,
    *,
    model_path: Path | str | None = None,
    tile_px: int = 256,
    overlap_px: int = 32,
    batch_size: int = 4,
    device: str = "auto",
    precision: str = "auto",
    ensemble: int | None = None,
    progress: ProgressCallback | None = None,
) -> DenoiseResult:
    """Denoise a stored CT series in this process; the result is stored as a derived CT series.

    ``progress(done, total)`` counts tiles.  Errors as :func:`denoise_series`.
    """
    from denoise.infer import denoise_slices
    from reconstruct.fdk.core import resolve_device

    where = resolve_device(device)
    options = resolved_options(tile_px, overlap_px, batch_size, precision, ensemble, where)
    started = time.perf_counter()
    series = read_stored_ct_series(services, series_instance_uid)
    checkpoint, net = prepare_checkpoint(model_path, options)
    phases = {"read": time.perf_counter() - started}
    begun = time.perf_counter()
    hu = denoise_slices(net, series.hu, device=where, progress=progress, **options.as_kwargs())
    phases["denoise"] = time.perf_counter() - begun
    return store_denoised(services, series, hu, checkpoint, options, phases_s=phases)


# ---------------------------------------------------------------- on Spark
def plan_partitions(slices: int, slice_bytes: int, parallelism: int, max_task_mb: float,
                    requested: int | None = None) -> int:
    """How many contiguous chunks of slices to send: ``requested``, else ``min(slices, parallelism)``,
    more while a chunk would not fit in a task message of ``max_task_mb``."""
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise ValueError(f"partitions: expected a positive integer, got {requested!r}")
    budget = (max_task_mb - _TASK_OVERHEAD_MB) * 2**20
    if slice_bytes > budget:
        raise ValueError(f"a slice of {slice_bytes / 2**20:.1f} MiB does not fit in a task message "
                         f"(spark.max_task_mb {max_task_mb:g}); raise spark.max_task_mb")
    count = min(slices, requested if requested is not None else max(1, parallelism))
    needed = math.ceil(slices / max(1, math.floor(budget / slice_bytes)))
    if requested is not None and needed > count:
        raise ValueError(f"partitions: {requested} partitions of {math.ceil(slices / count)} slices exceed a task "
                         f"message (spark.max_task_mb {max_task_mb:g}); use at least {needed}")
    return max(count, needed)


# A Python worker is reused across tasks (spark.python.worker.reuse): the model it loaded
# stays here, keyed by the checkpoint's SHA-256 and the device; one entry bounds its memory.
_WORKER_MODELS: dict[tuple[str, str], UNet] = {}


def _worker_model(checkpoint: Broadcast, sha256: str, name: str, device: str) -> UNet:
    from denoise.checkpoints import load_checkpoint

    key = (sha256, device)
    net = _WORKER_MODELS.get(key)
    if net is None:
        with tempfile.TemporaryDirectory(prefix="pacs-unet-") as folder:
            path = Path(folder) / name
            path.write_bytes(checkpoint.value)
            net, _ = load_checkpoint(path, device=device)
        _WORKER_MODELS.clear()
        _WORKER_MODELS[key] = net
    return net


def denoise_partition(
    rows: Iterable[tuple[int, bytes]],
    *,
    checkpoint: Broadcast,
    sha256: str,
    name: str,
    shape_hw: tuple[int, int],
    options: TileOptions,
    device: str,
) -> Iterator[tuple[int, bytes]]:
    """Executor side: ``(index, HU float32 bytes [H, W])`` rows -> the same rows denoised.

    The partition's slices go through :func:`denoise.infer.denoise_slices`
    together (tiles of all of them share batches, as in one process).
    """
    import torch
    from pyspark import TaskContext

    from denoise.infer import denoise_slices
    from reconstruct.fdk.core import resolve_device

    chunk = list(rows)
    if not chunk:
        return
    context = TaskContext.get()
    torch.set_num_threads(max(1, context.cpus() if context is not None else 1))
    where = str(resolve_device(device))
    net = _worker_model(checkpoint, sha256, name, where)
    hu = np.stack([np.frombuffer(data, dtype=np.float32).reshape(shape_hw) for _, data in chunk])
    out = denoise_slices(net, hu, device=where, **options.as_kwargs())
    for (index, _), pixels in zip(chunk, out):
        yield index, np.ascontiguousarray(pixels, dtype=np.float32).tobytes()


def denoise_slices_spark(
    spark: SparkSession,
    hu: np.ndarray,
    checkpoint: PreparedCheckpoint,
    options: TileOptions,
    *,
    device: str = "auto",
    partitions: int | None = None,
    max_task_mb: float = 256.0,
    progress: ProgressCallback | None = None,
    description: str = "denoise",
) -> tuple[np.ndarray, int]:
    """Denoise HU slices ``[N, H, W]`` on Spark; returns them denoised (float32, same order) and the partitions.

    ``progress(done, total)`` counts finished partition tasks.
    """
    from pacs.errors import JobFailed
    from pacs.spark import job_progress, task_error_message

    if hu.ndim != 3 or 0 in hu.shape:
        raise ValueError(f"hu: expected slices [N, H, W], got shape {hu.shape}")
    sc = spark.sparkContext
    n, h, w = hu.shape
    count = plan_partitions(n, 4 * h * w, sc.defaultParallelism, max_task_mb, partitions)
    log.info("%s: %d slices of %dx%d in %d partitions on %s", description, n, h, w, count, sc.master)
    rows = [(k, np.ascontiguousarray(hu[k], dtype=np.float32).tobytes()) for k in range(n)]
    shared = sc.broadcast(checkpoint.data)
    task = functools.partial(denoise_partition, checkpoint=shared, sha256=checkpoint.sha256, name=checkpoint.name,
                             shape_hw=(h, w), options=options, device=device)
    try:
        with job_progress(sc, progress, description=f"{description}: {count} partitions", expected_tasks=count):
            rdd = sc.parallelize(rows, count).mapPartitions(task)
            del rows  # the JVM holds the tasks' slices now
            try:
                results = rdd.collect()
            except Exception as exc:  # a task's Python error comes back wrapped by Py4J / pyspark
                raise JobFailed(f"{description} failed on Spark ({sc.master}): {task_error_message(exc)}") from exc
    finally:
        shared.unpersist()
    out = np.empty((n, h, w), dtype=np.float32)
    seen = set()
    for index, pixels in results:
        out[index] = np.frombuffer(pixels, dtype=np.float32).reshape(h, w)
        seen.add(index)
    if len(seen) != n:
        raise JobFailed(f"{description}: expected {n} denoised slices from Spark, got {len(seen)}")
    return out, count


def denoise_series(
    services: Services,
    series_instance_uid: str,
    *,
    model_path: Path | str | None = None,
    tile_px: int = 256,
    overlap_px: int = 32,
    batch_size: int = 4,
    device: str = "auto",
    precision: str = "auto",
    ensemble: int | None = None,
    master: str | None = None,
    partitions: int | None = None,
    spark: SparkSession | None = None,
    spark_settings: SparkSettings | None = None,
    progress: ProgressCallback | None = None,
) -> DenoiseResult:
    """Denoise a stored CT series on Spark; the result is stored as a derived CT series.

    The series and the checkpoint are read and checked before Spark starts, so
    an unknown series (``NotFound``), another modality or a slice without
    pixels (``DicomInputError``), a bad checkpoint (``CheckpointError``) or
    bad options (``ValueError``) cost no Spark start-up and store nothing;
    so does a bad master (``ValueError``, ``SparkUnavailable``) and a failing
    task (``JobFailed``).  ``spark`` reuses a running session; otherwise one
    is started for ``master`` (``None``: the settings' ``spark.master``, or
    the one spark-submit chose) and stopped at the end.  ``device`` is the
    executors' (``auto``: CUDA where they have it).  ``precision="auto"`` and
    ``ensemble=None`` are resolved here, on the driver, for ``device``
    (:func:`resolved_options`): every slice of the series gets the same
    settings, and the derived series names them.
    """
    from pacs.spark import launched_by_spark_submit, spark_session

    spark_settings = spark_settings or services.settings.spark
    if master is None and spark is None and not launched_by_spark_submit():
        master = spark_settings.master
    options = resolved_options(tile_px, overlap_px, batch_size, precision, ensemble, device)
    started = time.perf_counter()
    series = read_stored_ct_series(services, series_instance_uid)
    checkpoint, _ = prepare_checkpoint(model_path, options)
    n, h, w = series.hu.shape
    if partitions is not None:  # validates the count before Spark starts
        plan_partitions(n, 4 * h * w, partitions, spark_settings.max_task_mb, partitions)
    phases = {"read": time.perf_counter() - started}

    def run(session: SparkSession) -> tuple[np.ndarray, int, str]:
        begun = time.perf_counter()
        hu, used = denoise_slices_spark(session, series.hu, checkpoint, options, device=device,
                                        partitions=partitions, max_task_mb=spark_settings.max_task_mb,
                                        progress=progress, description=f"denoise {series_instance_uid}")
        phases["denoise"] = time.perf_counter() - begun
        return hu, used, session.sparkContext.master

    if spark is not None:
        hu, used, where = run(spark)
    else:
        begun = time.perf_counter()
        with spark_session(master, f"pacs denoise {series_instance_uid}", settings=spark_settings) as session:
            phases["spark start"] = time.perf_counter() - begun
            hu, used, where = run(session)
    log.info("series %s denoised in %d partitions on %s in %.1f s", series_instance_uid, used, where,
             phases["denoise"])
    result = store_denoised(services, series, hu, checkpoint, options, phases_s=phases)
    return dataclasses.replace(result, spark_master=where, partitions=used)


# ---------------------------------------------------------------- spark-submit entry
def main(argv: list[str] | None = None) -> int:
    """``spark-submit [--master URL] denoise/jobs.py SERIES_UID [options]``.

    Settings come from ``PACS_*`` variables / ``PACS_CONFIG`` like the
    ``pacs`` command (``--data-dir`` sets ``PACS_DATA_DIR``).  Under
    spark-submit its ``--master`` decides; run with plain ``python`` the
    ``--master`` option or the settings do.  Exit code 0 on success, 1 when
    the job fails or is refused, 2 for bad options.
    """
    parser = argparse.ArgumentParser(
        prog="spark-submit denoise/jobs.py",
        description="Denoise a stored CT series with the U-Net on Spark into a new derived CT series in the archive.",
    )
    parser.add_argument("series_uid", help="SeriesInstanceUID of a stored CT series")
    parser.add_argument("--data-dir", help="folder of the embedded default (env PACS_DATA_DIR)")
    parser.add_argument("--model", type=Path, help="checkpoint .pt (default: the one shipped in denoise/checkpoints)")
    parser.add_argument("--tile-px", type=int, default=256, help="tile size for inference")
    parser.add_argument("--overlap-px", type=int, default=32, help="overlap between tiles, blended smoothly")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (on the executors)")
    parser.add_argument("--precision", default="auto",
                        help="auto (bfloat16 where the hardware computes it natively, else float32), float32, "
                             "float16 (CUDA only) or bfloat16")
    parser.add_argument("--ensemble", type=int, default=None,
                        help="mirrored copies of every tile averaged: 1, 2, 4 or 8 (default: 4 in a reduced "
                             "precision, 1 in float32)")
    parser.add_argument("--partitions", type=int, help="chunks of slices, one task each (default: parallelism)")
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
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    def show(done: int, total: int) -> None:
        print(f"partitions {done}/{total}", file=sys.stderr, flush=True)

    try:
        with build_services(settings) as services:
            result = denoise_series(
                services, args.series_uid, model_path=args.model, tile_px=args.tile_px, overlap_px=args.overlap_px,
                batch_size=args.batch_size, device=args.device, precision=args.precision, ensemble=args.ensemble,
                master=args.master,
                partitions=args.partitions, progress=show)
    except (PacsError, ValueError) as exc:  # DicomInputError and CheckpointError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"stored CT series {result.series_instance_uid}: {result.slices} slices denoised with "
          f"unet-{result.model_version} ({result.partitions} partitions on {result.spark_master})")
    return 0


if __name__ == "__main__":  # spark-submit denoise/jobs.py ...
    # Run through the package's module so that the functions Spark ships to
    # executors are pickled by reference (denoise.jobs), not by value, and the
    # workers' model cache lives in that module.
    from denoise.jobs import main as _main

    sys.exit(_main())
