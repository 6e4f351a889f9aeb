"""``pacs denoise ...`` and ``pacs denoise-file``: the denoiser's command-line entry points.

Registered by ``pacs.cli.main``.  Nothing here imports torch at import time
(the ``pacs`` command must start fast): each command imports what it needs.
Jobs that denoise a stored series belong in this group too (``pacs denoise
run SERIES_UID`` with the archive's services).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["denoise_app", "denoise_file"]

console = Console(stderr=True)

_SERIES_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


class _SeriesUidGroup(TyperGroup):
    """``pacs denoise SERIES_UID [OPTIONS]`` is ``pacs denoise run SERIES_UID [OPTIONS]``: a UID is no command name."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and _SERIES_UID.fullmatch(args[0]) and "run" in self.commands:
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


denoise_app = typer.Typer(
    cls=_SeriesUidGroup,
    help="Low-dose and sparse-view CT denoising with a U-Net: `pacs denoise SERIES_UID` (short for `pacs denoise "
    "run SERIES_UID`) denoises a stored CT series into a derived one on Spark; `train` trains the network; "
    "`pacs denoise-file` denoises files. See docs/denoising.md.",
    no_args_is_help=True,
)


def _task_weights(text: str) -> dict[str, float]:
    from denoise.dataset import TASKS

    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"expected task=weight pairs like quarter=0.65,sparse=0.35, got {text!r}") from None
        if name.strip() not in TASKS:
            raise typer.BadParameter(f"expected tasks among {', '.join(TASKS)}, got {name.strip()!r}")
    if not weights:
        raise typer.BadParameter(f"expected at least one task=weight, got {text!r}")
    return weights


def _dose_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected two factors LO,HI like 0.25,16, got {text!r}",
                                 param_hint="--dose-range") from None
    return lo, hi


@denoise_app.command("train")
def train_command(
    out_dir: Annotated[Path, typer.Option(help="Folder for checkpoints, history.json, curves.png and state.pt.")] = Path(".stack/denoise-train/run"),
    cache_dir: Annotated[Path, typer.Option(help="Folder for the simulated slice pairs (re-used across runs).")] = Path(".stack/denoise-train/cache"),
    version: Annotated[str, typer.Option(help="Checkpoint version: files are named unet-<version>[-eNNN].pt.")] = "1.0",
    width: Annotated[int, typer.Option(help="Channels at the first level (doubling per level).")] = 32,
    depth: Annotated[int, typer.Option(help="Down-samplings in the U-Net.")] = 3,
    space_to_depth: Annotated[int, typer.Option(help="1, or 2 to run the network at half resolution on 4 channels.")] = 2,
    norm: Annotated[str, typer.Option(help="none or batch.")] = "none",
    residual: Annotated[bool, typer.Option("--residual/--no-residual", help="Predict the noise (output = input - net).")] = True,
    noise_level_input: Annotated[bool, typer.Option(
        "--noise-level-input/--blind",
        help="Give the network each slice's measured noise level as a second input plane (FFDNet-style); "
             "--init-from a blind checkpoint grows that input with zero weights.")] = False,
    epochs: Annotated[int, typer.Option(help="Epochs (validation and a checkpoint after each).")] = 20,
    steps_per_epoch: Annotated[int, typer.Option(help="Optimiser steps per epoch.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Patches per step (per process with --spark-processes).")] = 8,
    patch_px: Annotated[int, typer.Option(help="Square training patch size, a multiple of 2**depth.")] = 96,
    lr: Annotated[float, typer.Option(help="Initial Adam learning rate (cosine decay to lr-min).")] = 1e-3,
    lr_min: Annotated[float, typer.Option(help="Final learning rate.")] = 1e-5,
    loss: Annotated[str, typer.Option(
        help="l1 or mse: the distance in both loss terms (HU / 1000, and the W400/L40 window). mse is what "
             "PSNR scores; l1 trains faster from scratch but sharpens edges whose course the input leaves "
             "uncertain.")] = "l1",
    precision: Annotated[str, typer.Option(
        help="float32, or bfloat16: forward and backward passes under autocast (weights, optimiser and loss "
             "stay float32); validation is float32 either way.")] = "float32",
    train_slices: Annotated[int, typer.Option(help="Simulated 512x512 training slices.")] = 64,
    val_slices: Annotated[int, typer.Option(help="Held-out validation slices (another seed).")] = 3,
    tasks: Annotated[str, typer.Option(help="Task mix: quarter (quarter dose), sparse (50-150 views), gaussian (image noise).")] = "quarter=0.65,sparse=0.35",
    dose_range: Annotated[str, typer.Option(
        help="LO,HI: each training slice's photon count is the nominal I0 (5e5) times a factor drawn "
             "log-uniformly in [LO, HI], so the network sees many noise levels (1,1: the nominal dose only).")] = "1,1",
    grain_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of training slices whose ground truth is itself a full-dose scan "
                               "of the phantom, with its grain, as a real CT image is (0: textureless phantoms).")] = 0.0,
    extras_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of training phantoms with what real scans have and plain phantoms lack: "
                               "anatomy crossing the field of view's edge, a head holder, denser bone, fine "
                               "texture (0: plain phantoms).")] = 0.0,
    variety_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of training phantoms with a power-law texture through all tissue and "
                               "edge blur from 0 to 2 px (0: the generator's usual texture and edges).")] = 0.0,
    dead_leaves_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of training slices that are 'dead leaves' images (random occluding "
                               "shapes of every size, in CT values) instead of anatomy-like phantoms.")] = 0.0,
    dead_leaves_edge_px: Annotated[float, typer.Option(
        min=0.0, help="Give each dead leaf an edge ramp from 0 to this many pixels wide, as thick slices "
                      "cutting oblique surfaces make (0: sharp leaves).")] = 0.0,
    dead_leaves_rim_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of the dead leaves with a rim: a layer 0.5-4 px thick of another value "
                               "just inside the outline, as anatomy is layered (skin over fat, fluid between "
                               "skull and brain). 0: no rims.")] = 0.0,
    head_layers_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of the anatomy phantoms whose heads get fluid (0.5-4 px) and grey "
                               "matter under the skull. 0: one brain value against the bone.")] = 0.0,
    sharp_kernel_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Fraction of the training ground truths that ring along every edge as a scanner's "
                               "sharp reconstruction kernel leaves them (bright and dark bands 0.7-2.5 px wide). "
                               "0: none.")] = 0.0,
    phantom_edge_blur_px: Annotated[float, typer.Option(
        min=0.0, help="Draw the anatomy phantoms' edge blur (partial volume) from 0.3 to this many pixels "
                      "instead of 0.3-0.7 (0: their own).")] = 0.0,
    simulation_workers: Annotated[int, typer.Option(
        min=1, help="Processes simulating the missing training slices in parallel (one per core).")] = 1,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice); with --spark-processes each task uses spark.task.cpus instead.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (the training, and the simulation's projections).")] = "cpu",
    time_budget: Annotated[Optional[float], typer.Option(
        min=1.0, help="Seconds for all epochs (simulation excluded): --steps-per-epoch is then measured to fit "
                      "them, from a short timed probe; the checkpoints record the steps used.",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out-dir (its configuration wins; --epochs may extend it).")] = False,
    simulate_only: Annotated[bool, typer.Option(
        "--simulate-only", help="Simulate the missing training and validation slices into --cache-dir and stop: "
                                "runs started afterwards with the same data options find them there.")] = False,
    init_from: Annotated[Optional[Path], typer.Option(
        help="Fine-tune: start from this checkpoint's weights (its network must match --depth, "
             "--space-to-depth, --norm, --residual; a narrower one is widened to --width and a blind one given "
             "the noise-level input, both computing what the checkpoint did until trained) with a fresh "
             "optimiser and learning-rate schedule.",
        show_default=False)] = None,
    spark_processes: Annotated[Optional[int], typer.Option(
        "--spark-processes", min=1, show_default=False,
        help="Train data-parallel on N Spark tasks (PyTorch DDP, gloo): each draws --batch-size patches per step "
             "and the gradients are averaged, so a step learns from N x --batch-size patches. Needs N task slots "
             "(local[N] or N worker cores); --out-dir and --cache-dir must be visible to every executor. "
             "Default: no Spark, one process.")] = None,
    master: Annotated[Optional[str], typer.Option(
        help="Spark master for --spark-processes: local[N] or spark://HOST:PORT (default: setting spark.master, "
             "env PACS_SPARK_MASTER, else local[*]).", show_default=False)] = None,
) -> None:
    """Train the U-Net on simulated low-dose/reference pairs (simulated once, then cached).

    With --spark-processes N the training runs on N Spark barrier tasks (TorchDistributor): rank 0 validates
    and writes the checkpoints, state.pt and history.json, and this command prints each epoch as rank 0
    finishes it. See docs/denoising.md, "Training on Spark".
    """
    from denoise.dataset import SimulationConfig
    from denoise.model import UNetConfig
    from denoise.train import TrainConfig

    if spark_processes is None and master is not None:
        raise typer.BadParameter("expected --master only with --spark-processes, got --master without it",
                                 param_hint="--master")
    if spark_processes is not None and time_budget is not None:
        raise typer.BadParameter("expected --time-budget only without --spark-processes (each process would "
                                 "measure its own speed), got both", param_hint="--time-budget")
    if spark_processes is not None and threads is not None:
        raise typer.BadParameter("expected --threads only without --spark-processes (each Spark task uses "
                                 "spark.task.cpus threads), got both", param_hint="--threads")
    try:
        config = TrainConfig(
            out_dir=out_dir, cache_dir=cache_dir, version=version,
            model=UNetConfig(width=width, depth=depth, norm=norm, residual=residual, space_to_depth=space_to_depth,
                             noise_level_input=noise_level_input),
            simulation=SimulationConfig(dose_range=_dose_range(dose_range), grain_fraction=grain_fraction,
                                        extras_fraction=extras_fraction, variety_fraction=variety_fraction,
                                        dead_leaves_fraction=dead_leaves_fraction,
                                        dead_leaves_edge_px=dead_leaves_edge_px,
                                        dead_leaves_rim_fraction=dead_leaves_rim_fraction,
                                        head_layers_fraction=head_layers_fraction,
                                        sharp_kernel_fraction=sharp_kernel_fraction,
                                        phantom_edge_blur_px=phantom_edge_blur_px),
            simulation_workers=simulation_workers,
            epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, patch_px=patch_px, lr=lr,
            lr_min=lr_min, loss=loss, precision=precision, train_slices=train_slices, val_slices=val_slices, task_weights=_task_weights(tasks),
            threads=threads, device=device, init_from=init_from, time_budget_s=time_budget)
        config.check()
        if init_from is not None and not resume:
            from denoise.train import initial_weights

            initial_weights(config)  # a missing or mismatched checkpoint fails here, before any simulation
    except ValueError as exc:  # CheckpointError is one
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    started = time.perf_counter()
    if simulate_only:
        folders = _simulate_here(config)
        console.print(f"simulated in {time.perf_counter() - started:.0f} s: "
                      + ", ".join(f"{count} slices in {folder}" for folder, count in folders))
        return
    if spark_processes is not None:
        history = _train_on_spark(config, spark_processes, master, resume)
    else:
        history = _train_here(config, resume)
    best = max(history, key=lambda r: r.val_psnr_db)
    console.print(f"done in {time.perf_counter() - started:.0f} s; best epoch {best.epoch} "
                  f"({best.val_psnr_db:.2f} dB mean validation PSNR): {out_dir / f'unet-{version}.pt'}; "
                  f"curves in {out_dir / 'curves.png'}")


def _print_epoch(console_: Console, record) -> None:
    scores = "  ".join(f"{task} {v['psnr_db']:.2f} dB / SSIM {v['ssim']:.4f} (FBP {v['input_psnr_db']:.2f} dB)"
                       for task, v in record.val.items())
    console_.print(f"epoch {record.epoch}: loss {record.train_loss:.4f}, validation {scores}, "
                   f"{record.seconds:.0f} s")


def _simulate_here(config) -> list[tuple[Path, int]]:
    """``--simulate-only``: the training and validation sets into the cache, with a progress bar; (folder, slices)."""
    from denoise.dataset import simulate_pair_set

    done = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console) as progress:
        for name, seed, count in (("training slices", config.train_seed, config.train_slices),
                                  ("validation slices", config.val_seed, config.val_slices)):
            task = progress.add_task(f"simulating {name}", total=count)
            paths = simulate_pair_set(config.cache_dir, seed, count, config.simulation, workers=config.simulation_workers,
                                      device=config.device,
                                      progress=lambda n, total, task=task: progress.update(task, completed=n))
            progress.update(task, completed=count)
            done.append((paths[0].parent, count))
    return done


def _train_here(config, resume: bool) -> list:
    from denoise.train import train

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        data_task = progress.add_task("simulating pairs", total=None, note="")
        step_task = progress.add_task("training", total=None, note="")

        def on_data(name: str, done: int, total: int) -> None:
            progress.update(data_task, description=f"simulating {name}", completed=done, total=total)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(step_task, completed=step, total=total, note=f"loss {loss:.4f}")

        try:
            return train(config, resume=resume, on_step=on_step, on_epoch=lambda r: _print_epoch(progress.console, r),
                         on_data=on_data)
        except (ValueError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None


def _train_on_spark(config, processes: int, master: str | None, resume: bool) -> list:
    """``--spark-processes``: the master from the option or the settings; epoch-level progress."""
    import logging

    from denoise.distributed import train_on_spark
    from pacs.errors import PacsError
    from pacs.settings import load_settings

    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        settings = load_settings()
    except Exception as exc:  # pydantic's ValidationError and file errors: the settings are unusable
        console.print(f"[red]error:[/] settings: {exc}")
        raise typer.Exit(1) from None
    where = master or settings.spark.master
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                  TimeElapsedColumn(), console=console) as progress:
        data_task = progress.add_task("simulating pairs", total=None, note="")
        epoch_task = progress.add_task(f"epochs on Spark ({processes} processes, {where})", total=None,
                                       note="starting", visible=False)

        def on_data(name: str, done: int, total: int) -> None:
            progress.update(data_task, description=f"simulating {name}", completed=done, total=total)

        def on_start(done: int, total: int) -> None:
            progress.update(epoch_task, completed=done, total=total, visible=True)

        def on_epoch(record) -> None:
            progress.update(epoch_task, completed=record.epoch, note=f"loss {record.train_loss:.4f}")
            _print_epoch(progress.console, record)

        try:
            return train_on_spark(config, processes, resume=resume, master=master, spark_settings=settings.spark,
                                  on_data=on_data, on_start=on_start, on_epoch=on_epoch)
        except (PacsError, ValueError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None


PRECISION_HELP = ("auto (bfloat16 where the CPU or GPU computes it natively, else float32), float32, or "
                  "float16/bfloat16 (mixed precision, float16 on CUDA only).")
ENSEMBLE_HELP = ("Average this many mirrored copies of every tile (1, 2, 4 or 8): that many times the computation "
                 "for a better estimate (docs/denoising.md). Default: 4 in a reduced precision, 1 in float32.")


def _is_npy(path: Path) -> bool:
    return path.suffix.lower() == ".npy"


def denoise_file(
    in_path: Annotated[Path, typer.Argument(metavar="IN", help="A .npy of float32 HU slices [N, H, W] or [H, W], or a CT DICOM file or folder (one series).")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="A .npy (same shape, HU) for .npy input; a new folder of derived DICOM for DICOM input.")],
    model: Annotated[Optional[Path], typer.Option(help="Checkpoint .pt (default: the one shipped in denoise/checkpoints).")] = None,
    tile_px: Annotated[int, typer.Option(help="Tile size for inference.")] = 256,
    overlap_px: Annotated[int, typer.Option(help="Overlap between tiles, blended smoothly.")] = 32,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 4,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    ensemble: Annotated[Optional[int], typer.Option(help=ENSEMBLE_HELP, show_default=False)] = None,
) -> None:
    """Denoise CT slices from a file: a .npy of HU slices, or a CT series as DICOM (written as a new derived series).

    Nothing is written unless the whole input was read, the model loaded and
    every slice denoised.
    """
    import numpy as np

    from denoise.checkpoints import CheckpointError, load_checkpoint
    from denoise.dicom_io import DicomInputError, derived_ct_datasets, read_ct_series
    from denoise.infer import denoise_slices
    from denoise.jobs import derivation_text, resolved_options
    from reconstruct.fdk.core import resolve_device

    def fail(message: str, code: int = 1) -> None:
        console.print(f"[red]error:[/] {message}")
        raise typer.Exit(code)

    if out_path.exists() and not (out_path.is_dir() and not any(out_path.iterdir())):
        fail(f"OUT: expected a path that does not exist yet (or an empty folder), got {str(out_path)!r}, which exists", 2)
    series = None
    try:
        if _is_npy(in_path):
            if not _is_npy(out_path):
                fail(f"OUT: expected a .npy path for .npy input, got {str(out_path)!r}", 2)
            if not in_path.is_file():
                fail(f"IN: expected a .npy file, got {str(in_path)!r} (no such file)", 2)
            try:
                slices = np.load(in_path, allow_pickle=False)
            except (ValueError, OSError) as exc:
                fail(f"IN {in_path.name}: expected a .npy array, got unreadable data ({exc})")
            if slices.ndim not in (2, 3) or not np.issubdtype(slices.dtype, np.number) or 0 in slices.shape:
                fail(f"IN {in_path.name}: expected numeric HU slices [N, H, W] or [H, W], got dtype {slices.dtype} "
                     f"shape {slices.shape}")
        else:
            if _is_npy(out_path):
                fail(f"OUT: expected a folder for DICOM input, got the .npy path {str(out_path)!r}", 2)
            series = read_ct_series(in_path)
            slices = series.hu
        where = resolve_device(device)
        net, meta = load_checkpoint(model, device=where)
        options = resolved_options(tile_px, overlap_px, batch_size, precision, ensemble, where)
        with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console) as progress:
            task = progress.add_task("tiles", total=None)
            result = denoise_slices(net, slices, **options.as_kwargs(),
                                    progress=lambda done, total: progress.update(task, completed=done, total=total))
    except (DicomInputError, CheckpointError, ValueError) as exc:
        fail(str(exc))
    version = meta.get("version", "?")
    if series is None:
        partial = out_path.with_name(out_path.name + ".partial.npy")
        np.save(partial, result.astype(np.float32))
        partial.replace(out_path)
        console.print(f"wrote {out_path}: {result.shape} float32 HU (model unet-{version})")
        return
    derivation = derivation_text(version, Path(meta["path"]).name, options)
    datasets = derived_ct_datasets(series, result, model_version=version, derivation=derivation)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        for i, ds in enumerate(datasets, 1):
            ds.save_as(staging / f"{i:05d}.dcm", enforce_file_format=True)
        if out_path.exists():
            out_path.rmdir()  # the empty folder checked above
        staging.replace(out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    console.print(f"wrote {len(datasets)} instances of series {datasets[0].SeriesInstanceUID} to {out_path} "
                  f"(model unet-{version})")


if __name__ == "__main__":  # `python -m denoise.cli train ...`: `pacs denoise` without the archive's own imports
    import denoise.cli
    import denoise.run_cli  # noqa: F401  (registers `run`, as `pacs` does)

    denoise.cli.denoise_app()  # that module's app, on which run_cli registered, not this __main__ copy's
