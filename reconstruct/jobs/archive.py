"""Reconstruct a stored projection series and store the volume as a new CT series.

This is the archive-facing job: it reads the series through the index and the
object store of :class:`pacs.services.Services`, runs :func:`reconstruct.fdk.fdk`
in this process, and writes every slice through the same ingest path as a
modality's C-STORE, so the result is indexed, queryable and retrievable.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pydicom

from reconstruct.dicom_io import geometry_from_projection_datasets, volume_to_ct_datasets
from reconstruct.geometry import VolumeGrid

if TYPE_CHECKING:  # pacs is the caller's; imported lazily so reconstruct stands alone
    from pacs.services import Services

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructionResult:
    source_series_instance_uid: str
    series_instance_uid: str
    slices: int
    grid: VolumeGrid


def load_series(services: Services, series_instance_uid: str) -> list[pydicom.Dataset]:
    """Every stored instance of a series, parsed (checksums verified on read)."""
    from sqlalchemy import select

    from pacs.errors import NotFound
    from pacs.index.models import Instance, Series
    from pacs.index.repository import location_of

    query = (
        select(Instance.container, Instance.offset, Instance.length, Instance.sha256)
        .join(Series, Instance.series_fk == Series.id)
        .where(Series.series_instance_uid == series_instance_uid)
        .order_by(Instance.instance_number, Instance.id)
    )
    with services.db.session() as session:
        rows = session.execute(query).all()
    if not rows:
        raise NotFound(f"no stored series {series_instance_uid}")
    return [pydicom.dcmread(io.BytesIO(services.objects.get(location_of(row)))) for row in rows]


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
    """FDK of a stored projection series; the volume is stored as a derived CT series."""
    from reconstruct.fdk import fdk

    datasets = load_series(services, series_instance_uid)
    geometry, projections = geometry_from_projection_datasets(datasets)
    grid = VolumeGrid(dimension, spacing)
    log.info("reconstructing series %s: %d projections -> %s voxels", series_instance_uid,
             geometry.n_projections, grid.shape)
    volume = fdk(projections, geometry, grid, filter=filter, device=device, progress=progress)
    nx, ny, nz = grid.dimension_xyz
    slices = volume_to_ct_datasets(
        volume, grid, source=datasets,
        series_description=f"FDK {filter} {nx}x{ny}x{nz}",
        derivation_description=f"FDK cone-beam reconstruction, {filter} window, of series {series_instance_uid}",
    )
    for dataset in slices:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        services.ingest.store(buffer.getvalue(), source_ae="RECONSTRUCT")
    return ReconstructionResult(series_instance_uid, str(slices[0].SeriesInstanceUID), len(slices), grid)
