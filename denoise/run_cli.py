"""``pacs denoise run SERIES_UID``: denoise a stored CT series into a derived series in the archive.

Registers itself on :data:`denoise.cli.denoise_app` when imported
(``pacs.cli.main`` does).  The job itself is :mod:`denoise.jobs`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from denoise.cli import ENSEMBLE_HELP, PRECISION_HELP, console, denoise_app

__all__ = ["denoise_run"]


@denoise_app.command("run")
def denoise_run(
    series_uid: Annotated[str, typer.Argument(help="SeriesInstanceUID of a stored CT series.")],
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint .pt (default: the one shipped in denoise/checkpoints).")] = None,
    tile_px: Annotated[int, typer.Option(help="Tile size for inference.")] = 256,
    overlap_px: Annotated[int, typer.Option(help="Overlap between tiles, blended smoothly.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 4,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (on the Spark executors, or in this process).")] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    ensemble: Annotated[Optional[int], typer.Option(help=ENSEMBLE_HELP, show_default=False)] = None,
    master: Annotated[Optional[str], typer.Option(
        help="Spark master: local[*], local[N] or spark://HOST:PORT (default: setting spark.master, env "
             "PACS_SPARK_MASTER, else local[*]); 'none' runs in this process.", show_default=False)] = None,
    partitions: Annotated[Optional[int], typer.Option(
        help="Chunks of slices, one Spark task each (default: the master's parallelism).", min=1,
        show_default=False)] = None,
    in_process: Annotated[bool, typer.Option("--in-process", help="Denoise in this process, without Spark.")] = False,
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="Folder for the embedded default's files (env PACS_DATA_DIR).", show_default=False)] = None,
) -> None:
    """Denoise a stored CT series with the U-Net into a new derived CT series in the archive.

    By default a Spark job (local mode unless --master or the settings name a
    cluster): the checkpoint is broadcast once and each task denoises a chunk
    of slices.  The series and the checkpoint are checked first; nothing is
    stored unless every slice was denoised.  Prints the new SeriesInstanceUID.
    See docs/denoising.md.
    """
    # pacs.cli.main imports this module; its helpers are imported when the command runs
    from pacs.cli.main import _progress_bar, _services
    from pacs.errors import PacsError

    in_process = in_process or (master is not None and master.strip().lower() == "none")
    if in_process and partitions is not None:
        raise typer.BadParameter("--partitions: expected only with Spark, got --in-process / --master none")
    options = dict(model_path=model, tile_px=tile_px, overlap_px=overlap_px, batch_size=batch_size, device=device,
                   precision=precision, ensemble=ensemble)
    with _services(data_dir) as services:
        try:
            if in_process:
                from denoise.jobs import denoise_series_in_process

                with _progress_bar("denoising tiles") as update:
                    result = denoise_series_in_process(services, series_uid, progress=update, **options)
            else:
                from denoise.jobs import denoise_series

                logging.getLogger("py4j").setLevel(logging.WARNING)
                with _progress_bar(f"partitions on {master or services.settings.spark.master}") as update:
                    result = denoise_series(services, series_uid, master=master, partitions=partitions,
                                            progress=update, **options)
        except (PacsError, ValueError) as exc:  # DicomInputError and CheckpointError are ValueErrors
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
    where = "" if result.spark_master is None else f" ({result.partitions} partitions on {result.spark_master})"
    console.print(f"stored CT series {result.series_instance_uid}: {result.slices} slices denoised with "
                  f"unet-{result.model_version}{where}")
    typer.echo(result.series_instance_uid)
