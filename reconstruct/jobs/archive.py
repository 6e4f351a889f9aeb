"""Reconstruct a stored projection series and store the volume as a new CT series.

This is the archive-facing job: it reads the series through the index and the
object store of :class:`pacs.services.Services`, runs :func:`reconstruct.fdk.fdk`
in this process, and writes every slice through the same ingest path as a
modality's C-STORE, so the result is indexed, queryable and retrievable.
The Spark job (:mod:`reconstruct.jobs.spark`) reads and stores with the same
functions (:func:`read_projection_series`, :func:`store_volume`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pydicom

from reconstruct.dicom_io import geometry_from_projection_datasets, volume_to_ct_datasets
from reconstruct.geometry import ConeBeamGeometry, VolumeGrid

if TYPE_CHECKING:  # pacs is the caller's; imported lazily so reconstruct stands alone
    from pacs.services import Services

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructionResult:
    source_series_instance_uid: str
    series_instance_uid: str
    slices: int
    grid: VolumeGrid
    # Wall seconds of each phase: "read" (series from the archive), "reconstruct", "store"
    # (and "spark start" when the job started a Spark session).
    phases_s: Mapping[str, float] = field(default_factory=dict)
    # Where it ran: None in this process; else the Spark master and the number of slabs.
    spark_master: str | None = None
    slabs: int | None = None


@dataclass(frozen=True)
class ProjectionSeries:
    """A stored projection series, read once: its instances, acquisition and line integrals."""

    series_instance_uid: str
    datasets: list[pydicom.Dataset]  # metadata only: Pixel Data is dropped once decoded
    geometry: ConeBeamGeometry
    projections: np.ndarray  # [angle, v, u] float32 line integrals


def load_series(services: Services, series_instance_uid: str) -> list[pydicom.Dataset]:
    """Every stored instance of a series, parsed (checksums verified on read)."""
    from sqlalchemy import select

    from pacs.errors import NotFound
    from pacs.index.models import Instance, Series
    from pacs.index.repository import LOCATION_COLUMNS, location_of

    query = (
        select(*LOCATION_COLUMNS)
        .join(Series, Instance.series_fk == Series.id)
        .where(Series.series_instance_uid == series_instance_uid)
        .order_by(Instance.instance_number, Instance.id)
    )
    with services.db.session() as session:
        rows = session.execute(query).all()
    if not rows:
        raise NotFound(f"no stored series {series_instance_uid}")
    return [pydicom.dcmread(io.BytesIO(data)) for data in services.objects.get_many(location_of(row) for row in rows)]


def read_projection_series(services: Services, series_instance_uid: str) -> ProjectionSeries:
    """Load a stored series and decode it as projections (``ValueError`` if it is not one)."""
    datasets = load_series(services, series_instance_uid)
    geometry, projections = geometry_from_projection_datasets(datasets)
    for dataset in datasets:  # the projections hold the pixels now; the result only needs the metadata
        if "PixelData" in dataset:
            del dataset.PixelData
    return ProjectionSeries(series_instance_uid, datasets, geometry, projections)


def store_volume(
    services: Services,
    volume: np.ndarray,
    grid: VolumeGrid,
    series: ProjectionSeries,
    *,
    filter: str,
    phases_s: Mapping[str, float] | None = None,
) -> ReconstructionResult:
    """Store an FDK volume of ``series`` as a derived CT series, one slice per y, through ingest."""
    started = time.perf_counter()
    nx, ny, nz = grid.dimension_xyz
    uid = series.series_instance_uid
    slices = volume_to_ct_datasets(
        volume, grid, source=series.datasets,
        series_description=f"FDK {filter} {nx}x{ny}x{nz}",
        derivation_description=f"FDK cone-beam reconstruction, {filter} window, of series {uid}",
    )
    for dataset in slices:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        services.ingest.store(buffer.getvalue(), source_ae="RECONSTRUCT")
    phases = {**(phases_s or {}), "store": time.perf_counter() - started}
    log.info("stored CT series %s (%d slices) from series %s", slices[0].SeriesInstanceUID, len(slices), uid)
    return ReconstructionResult(uid, str(slices[0].SeriesInstanceUID), len(slices), grid, phases)


def reconstruct_series(
    services: Services,
    series_instance_uid: str,
    *,
    dimension: int | tuple[int, int, int],
    spacing: float | tuple[float, float, float],
    filter: str = "ram-lak",
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> ReconstructionResult:
    """FDK of a stored projection series in this process; the volume is stored as a derived CT series."""
    from reconstruct.fdk import fdk

    started = time.perf_counter()
    series = read_projection_series(services, series_instance_uid)
    grid = VolumeGrid(dimension, spacing)
    read_s = time.perf_counter() - started
    log.info("reconstructing series %s: %d projections -> %s voxels", series_instance_uid,
             series.geometry.n_projections, grid.shape)
    volume = fdk(series.projections, series.geometry, grid, filter=filter, device=device, progress=progress)
    phases = {"read": read_s, "reconstruct": time.perf_counter() - started - read_s}
    return store_volume(services, volume, grid, series, filter=filter, phases_s=phases)
