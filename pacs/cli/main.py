"""``pacs``: one command for operators and researchers.

Each subcommand parses its options, loads the settings, builds the services
and calls one library function.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from denoise.cli import denoise_app, denoise_file
from denoise.run_cli import denoise_run  # noqa: F401  (registers `pacs denoise run`)
from pacs.errors import PacsError

app = typer.Typer(
    help="A processing-oriented DICOM archive: storage on local disk or HDFS, an SQL index, "
    "DICOM and DICOMweb services, and Spark reconstruction/denoising jobs.\n\n"
    "With no configuration everything lives under ./pacs-data (local files + SQLite). "
    "Settings come from PACS_* environment variables or a TOML file named by PACS_CONFIG; "
    "see docs/operations.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the index database schema.", no_args_is_help=True)
storage_app = typer.Typer(help="Maintain the bulk store: compaction and checksum scrubs.", no_args_is_help=True)
ae_app = typer.Typer(help="Manage the remote AEs the archive knows (C-MOVE destinations).", no_args_is_help=True)
app.add_typer(ae_app, name="ae")
app.add_typer(db_app, name="db")
app.add_typer(storage_app, name="storage")
app.add_typer(denoise_app, name="denoise")
app.command("denoise-file")(denoise_file)

console = Console(stderr=True)
DataDir = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="Folder for the embedded default's files (env PACS_DATA_DIR).", show_default=False),
]


@contextmanager
def _progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr; yields ``update(done, total)`` for library callbacks."""
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _settings(data_dir: Path | None):
    from pacs.settings import load_settings

    if data_dir is not None:
        os.environ["PACS_DATA_DIR"] = str(data_dir)
    try:
        return load_settings()
    except Exception as exc:
        console.print(f"[red]invalid settings:[/] {exc}")
        raise typer.Exit(2) from None


def _services(data_dir: Path | None):
    from pacs.services import build_services

    settings = _settings(data_dir)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        return build_services(settings)
    except PacsError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None


@app.command()
def store(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files, or folders searched recursively.")],
    data_dir: DataDir = None,
    source_ae: Annotated[str, typer.Option(help="Recorded as the instances' source.")] = "CLI",
) -> None:
    """Import DICOM files through the ingest service, with a progress bar.

    Files that are not acceptable DICOM are reported and skipped; the exit
    code is 1 if any file failed.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            console.print(f"[red]no such file or folder:[/] {path}")
            raise typer.Exit(2)
    failures = 0
    counts: dict[str, int] = {}
    with _services(data_dir) as services:
        with Progress(
            TextColumn("storing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        ) as progress:
            task = progress.add_task("store", total=len(files))
            for path in files:
                try:
                    result = services.ingest.store(path, source_ae=source_ae)
                    counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
                except PacsError as exc:
                    failures += 1
                    progress.console.print(f"[yellow]skipped[/] {exc}")
                progress.advance(task)
        services.compactor.compact()
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing stored"
    console.print(f"{summary}; {failures} failed")
    raise typer.Exit(1 if failures else 0)


@app.command()
def serve(
    data_dir: DataDir = None,
    aet: Annotated[Optional[str], typer.Option("--aet", help="The archive's AE title (env PACS_AET).")] = None,
    dicom_port: Annotated[Optional[int], typer.Option("--dicom-port", help="DICOM port (env PACS_DICOM_PORT).")] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Address to listen on (default 127.0.0.1).")] = None,
    workers: Annotated[int, typer.Option(help="Processes sharing the port, so parallel associations use all cores.")] = 1,
) -> None:
    """Run the archive's DICOM service (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE) until interrupted."""
    if aet:
        os.environ["PACS_AET"] = aet
    if dicom_port is not None:
        os.environ["PACS_DICOM_PORT"] = str(dicom_port)
    if host:
        os.environ["PACS_DICOM__HOST"] = host
    if data_dir is not None:
        os.environ["PACS_DATA_DIR"] = str(data_dir)
    if workers < 1:
        console.print(f"[red]--workers must be at least 1, got {workers}[/]")
        raise typer.Exit(2)
    if workers == 1:
        _serve_worker()
        return
    services = _services(None)  # create or upgrade the index once, before the workers start
    dicom = services.settings.dicom
    services.close()
    import multiprocessing
    import signal

    from pacs.net.scp import listening_socket

    try:
        listening = listening_socket(dicom.host, dicom.port)  # one socket, every worker accepts from it
    except OSError as exc:
        console.print(f"[red]cannot listen on {dicom.host}:{dicom.port}: {exc.strerror}[/]")
        raise typer.Exit(1) from None
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no threads inherited; the socket is passed
    processes = [spawn.Process(target=_serve_worker, kwargs={"listening": listening}, name=f"pacs-worker-{n}")
                 for n in range(workers)]
    for process in processes:
        process.start()
    console.print(f"started {workers} workers: pids {', '.join(str(p.pid) for p in processes)}")

    def stop(*_args: object) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM to that PID: the worker shuts down cleanly

    signal.signal(signal.SIGTERM, stop)
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        stop()
        for process in processes:
            process.join(timeout=30)
    failed = [p for p in processes if p.exitcode not in (0, None, -signal.SIGTERM)]
    raise typer.Exit(1 if failed else 0)


def _serve_worker(*, listening: socket.socket | None = None) -> None:
    """One serving process: its own services, the SCP, and periodic compaction."""
    import gc
    import signal

    from pacs.net.scp import start_scp

    def interrupt(*_args: object) -> None:
        # Once: a process group stopped by a signal gets it from the parent too, and a
        # second interruption in the middle of the shutdown would skip closing the services
        # (open packs sealed, connections returned).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    services = _services(None)
    settings = services.settings
    console.print(
        f"[bold]pacs[/] serving AE [bold]{settings.dicom.ae_title}[/] on "
        f"{settings.dicom.host}:{settings.dicom.port} (pid {os.getpid()}) — storage {services.objects.description}, "
        f"index {services.db.describe()}. Ctrl-C stops."
    )
    server = start_scp(services, listening=listening)
    # What is alive now lives as long as the process: keep it out of the collector's full
    # passes. pynetdicom's server forces one every 60 requests, and walking the ~100,000
    # start-up objects held the GIL ~30 ms, a stall for every association in progress.
    gc.freeze()
    parent = os.getppid()
    compact_every_s = settings.storage.landing_max_age_s / 4
    next_compaction = time.monotonic() + compact_every_s
    try:
        while True:
            time.sleep(1.0)
            if listening is not None and os.getppid() != parent:
                console.print(f"the parent process {parent} is gone: stopping (pid {os.getpid()})")
                break  # a worker never outlives the `pacs serve` that started it
            if time.monotonic() >= next_compaction:
                # packs objects that waited past their landing age; a failure is logged and the
                # next round retries (the store or the index away must not stop serving)
                services.compactor.compact_in_background()
                next_compaction = time.monotonic() + compact_every_s
    except KeyboardInterrupt:
        console.print(f"stopping (pid {os.getpid()})")
    finally:
        server.shutdown()
        services.close()


@app.command("ls")
def list_(
    data_dir: DataDir = None,
    patient: Annotated[Optional[str], typer.Option(help="PatientID to show (wildcards * and ? allowed).")] = None,
) -> None:
    """List patients, their studies and series with IDs, UIDs and instance counts."""
    from sqlalchemy import select

    from pacs.index.models import Series, Study
    from pacs.query.matching import Level, build_query

    with _services(data_dir) as services, services.db.session() as session:
        query = build_query(Level.PATIENT, {"PatientID": patient} if patient else {})
        patients = session.scalars(query).all()
        table = Table("patient / study / series", "ID / UID", "description", "date", "instances", box=None)
        for p in patients:
            table.add_row(f"[bold]{p.patient_name or '(no name)'}[/]", p.patient_id, p.patient_sex, p.patient_birth_date,
                          str(p.num_instances))
            for st in session.scalars(select(Study).where(Study.patient_fk == p.id).order_by(Study.study_date)):
                table.add_row(f"  study {st.study_id or st.accession_number}", st.study_instance_uid,
                              st.study_description, st.study_date, str(st.num_instances))
                for se in session.scalars(select(Series).where(Series.study_fk == st.id).order_by(Series.series_number)):
                    table.add_row(f"    series {se.series_number if se.series_number is not None else ''} {se.modality}",
                                  se.series_instance_uid, se.series_description, se.series_date, str(se.num_instances))
        Console().print(table)
        if not patients:
            console.print("the archive is empty" if not patient else f"no patient matches {patient!r}")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the .dcm files into (created).")],
    studies: Annotated[int, typer.Option(help="Number of studies.")] = 3,
    series: Annotated[int, typer.Option(help="Series per study (CT and MR alternate).")] = 2,
    instances: Annotated[int, typer.Option(help="Instances per series.")] = 10,
    size: Annotated[int, typer.Option(help="Rows and columns of each image.")] = 256,
) -> None:
    """Write synthetic CT/MR studies as DICOM files (for demos and tests; no PHI)."""
    from pacs.synthetic import make_study_set

    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, data in enumerate(make_study_set(studies, series, instances, rows=size, columns=size), 1):
        (out_dir / f"{count:06d}.dcm").write_bytes(data)
    console.print(f"wrote {count} instances to {out_dir}")


def _numbers(text: str | None, what: str, counts: tuple[int, ...]) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if len(values) not in counts:
        raise typer.BadParameter(f"{what}: expected {' or '.join(map(str, counts))} values, got {text!r}")
    return values


@app.command()
def fdk(
    projections: Annotated[Path, typer.Option(help="Projections .npy, float32 line integrals [angle, v, u].")],
    geometry: Annotated[Path, typer.Option(help="RTK geometry XML (ThreeDCircularProjectionGeometry) or JSON.")],
    out: Annotated[Path, typer.Option(help="Output volume .npy, float32 attenuation (1/mm) [z, y, x].")],
    dimension: Annotated[str, typer.Option(help="Volume size in voxels: one value or x,y,z.")] = "256",
    spacing: Annotated[str, typer.Option(help="Voxel size in mm: one value or x,y,z.")] = "1",
    origin: Annotated[Optional[str], typer.Option(help="Centre of the first voxel x,y,z in mm (default: volume centred on the isocentre).")] = None,
    detector_spacing: Annotated[Optional[str], typer.Option(help="Detector pixel size in mm: one value or u,v (required with RTK XML).")] = None,
    detector_origin: Annotated[Optional[str], typer.Option(help="Centre of the first detector pixel u,v in mm (default: detector centred on the central ray).")] = None,
    filter_: Annotated[str, typer.Option("--filter", help="Ramp window: ram-lak, shepp-logan, cosine, hamming, hann.")] = "ram-lak",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Reconstruct a cone-beam projection stack with FDK (options mirror RTK's rtkfdk).

    Arrays use the layout numpy gets from RTK's images, so a projection stack
    and geometry XML that RTK users already have reconstruct unchanged.
    """
    from reconstruct.cli import run_fdk

    args = dict(
        dimension=_numbers(dimension, "--dimension", (1, 3)),
        spacing=_numbers(spacing, "--spacing", (1, 3)),
        origin=_numbers(origin, "--origin", (3,)),
        detector_spacing=_numbers(detector_spacing, "--detector-spacing", (1, 2)),
        detector_origin=_numbers(detector_origin, "--detector-origin", (2,)),
    )
    args["dimension"] = [int(v) for v in args["dimension"]]
    with _progress_bar("backprojecting") as update:
        try:
            grid = run_fdk(projections, geometry, out, filter=filter_, device=device, progress=update, **args)
        except (ValueError, FileNotFoundError, OSError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
    console.print(f"wrote {out}: {grid.shape} voxels [z, y, x]")


@app.command("synth-projections")
def synth_projections(
    out: Annotated[Path, typer.Argument(help="The .dcm file to write (one multi-frame X-ray angiographic instance).")],
    views: Annotated[int, typer.Option(help="Number of projections over 360 degrees.")] = 180,
    detector: Annotated[int, typer.Option(help="Detector rows and columns.")] = 128,
    pixel_mm: Annotated[float, typer.Option(help="Detector pixel size in mm.")] = 3.0,
    radius_mm: Annotated[float, typer.Option(help="Radius of the Shepp-Logan head in mm.")] = 90.0,
) -> None:
    """Write a simulated cone-beam scan of the 3D Shepp-Logan head (exact line integrals) as DICOM."""
    from reconstruct.dicom_io import projections_to_multiframe
    from reconstruct.geometry import ConeBeamGeometry
    from reconstruct.phantom import project_ellipsoids, shepp_logan_3d

    geometry = ConeBeamGeometry.circular(views, source_to_isocenter_mm=500.0, source_to_detector_mm=1000.0,
                                         detector_size_uv=detector, detector_spacing_uv_mm=pixel_mm)
    # attenuation of water-like tissue, 1/mm, so the reconstruction reads in HU
    projections = project_ellipsoids(shepp_logan_3d(radius_mm, density_scale=0.0195), geometry)
    projections_to_multiframe(projections, geometry).save_as(out, enforce_file_format=True)
    console.print(f"wrote {out}: {views} projections of {detector}x{detector}")


@app.command()
def reconstruct(
    series_uid: Annotated[str, typer.Argument(help="SeriesInstanceUID of a stored projection series.")],
    dimension: Annotated[str, typer.Option(help="Volume size in voxels: one value or x,y,z.")] = "256",
    spacing: Annotated[str, typer.Option(help="Voxel size in mm: one value or x,y,z.")] = "1",
    filter_: Annotated[str, typer.Option("--filter", help="Ramp window: ram-lak, shepp-logan, cosine, hamming, hann.")] = "hann",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (on the Spark executors, or in this process).")] = "auto",
    master: Annotated[Optional[str], typer.Option(
        help="Spark master: local[*], local[N] or spark://HOST:PORT (default: setting spark.master, env "
             "PACS_SPARK_MASTER, else local[*]); 'none' runs in this process.", show_default=False)] = None,
    slabs: Annotated[Optional[int], typer.Option(
        help="Slabs along the rotation axis, one Spark task each (default: max(2, the master's parallelism)).",
        min=1, show_default=False)] = None,
    in_process: Annotated[bool, typer.Option("--in-process", help="Reconstruct in this process, without Spark.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Reconstruct a stored cone-beam projection series (FDK) into a new CT series in the archive.

    By default a Spark job (local mode unless --master or the settings name a
    cluster) cuts the volume into slabs along the rotation axis and gives each
    task only the detector rows its slab projects onto; see
    docs/reconstruction.md.  The projection tags read are listed in
    docs/conformance.md.
    """
    from reconstruct.jobs.archive import reconstruct_series

    sizes = [int(v) for v in _numbers(dimension, "--dimension", (1, 3))]
    voxel = _numbers(spacing, "--spacing", (1, 3))
    in_process = in_process or (master is not None and master.strip().lower() == "none")
    if in_process and slabs is not None:
        raise typer.BadParameter("--slabs: expected only with Spark, got --in-process / --master none")
    shape = dict(dimension=tuple(sizes) if len(sizes) == 3 else sizes[0],
                 spacing=tuple(voxel) if len(voxel) == 3 else voxel[0], filter=filter_, device=device)
    with _services(data_dir) as services:
        try:
            if in_process:
                with _progress_bar("backprojecting") as update:
                    result = reconstruct_series(services, series_uid, progress=update, **shape)
            else:
                from reconstruct.jobs.spark import reconstruct_series_spark

                logging.getLogger("py4j").setLevel(logging.WARNING)
                with _progress_bar(f"slabs on {master or services.settings.spark.master}") as update:
                    result = reconstruct_series_spark(services, series_uid, master=master, slabs=slabs,
                                                      progress=update, **shape)
        except (PacsError, ValueError) as exc:
            console.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
    where = "" if result.spark_master is None else f" ({result.slabs} slabs on {result.spark_master})"
    console.print(f"stored CT series {result.series_instance_uid}: {result.slices} slices{where}")


@app.command()
def info(data_dir: DataDir = None) -> None:
    """Show the backends in use and what the archive holds."""
    from sqlalchemy import func, select

    from pacs.index.models import Container, Instance, Patient, Series, Study
    from pacs.index.repository import landing_totals

    with _services(data_dir) as services, services.db.session() as session:
        rows = {
            "storage": services.objects.description,
            "index": services.db.describe(),
            "patients": session.scalar(select(func.count()).select_from(Patient)),
            "studies": session.scalar(select(func.count()).select_from(Study)),
            "series": session.scalar(select(func.count()).select_from(Series)),
            "instances": session.scalar(select(func.count()).select_from(Instance)),
            "bytes": session.scalar(select(func.coalesce(func.sum(Instance.length), 0))),
            "landing (unpacked) instances": landing_totals(session)[0],
            "packs": session.scalar(select(func.count()).select_from(Container)),
        }
    for key, value in rows.items():
        print(f"{key:>30}: {value}")


def _peer(services, ae_title: str, host: str | None, port: int | None) -> tuple[str, int]:
    if host and port:
        return host, port
    from pacs.index.repository import find_remote_ae

    with services.db.session() as session:
        peer = find_remote_ae(session, ae_title)
        if peer is None:
            console.print(f"[red]unknown AE {ae_title!r}:[/] add it with `pacs ae add` or give --host and --port")
            raise typer.Exit(2)
        return peer.host, peer.port


@app.command()
def echo(
    ae_title: Annotated[str, typer.Argument(help="The peer's AE title (looked up in `pacs ae list` unless --host/--port).")],
    host: Annotated[Optional[str], typer.Option(help="The peer's host.")] = None,
    port: Annotated[Optional[int], typer.Option(help="The peer's port.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Send a C-ECHO to a peer (test a route)."""
    from pacs.net.scu import echo as c_echo

    with _services(data_dir) as services:
        address = _peer(services, ae_title, host, port)
        try:
            status = c_echo(*address, called_ae=ae_title, calling_ae=services.settings.dicom.ae_title)
        except ConnectionError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from None
    console.print(f"C-ECHO {ae_title} at {address[0]}:{address[1]}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


@app.command()
def push(
    ae_title: Annotated[str, typer.Argument(help="Destination AE title (from `pacs ae list` unless --host/--port).")],
    study: Annotated[str, typer.Option(help="StudyInstanceUID to send.")],
    series: Annotated[Optional[str], typer.Option(help="Only this SeriesInstanceUID.")] = None,
    host: Annotated[Optional[str], typer.Option(help="The peer's host.")] = None,
    port: Annotated[Optional[int], typer.Option(help="The peer's port.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Send a stored study (or series) to a remote AE with C-STORE, as stored."""
    from pacs.net.scu import push as c_push

    with _services(data_dir) as services:
        address = _peer(services, ae_title, host, port)
        with _progress_bar("sending") as update:
            try:
                report = c_push(services, *address, called_ae=ae_title, study_instance_uid=study,
                                series_instance_uid=series, on_progress=update)
            except (ConnectionError, PacsError) as exc:
                console.print(f"[red]{exc}[/]")
                raise typer.Exit(1) from None
    for sop_uid, problem in report.failed:
        console.print(f"[red]{sop_uid}:[/] {problem}")
    console.print(f"{report.sent} sent, {len(report.failed)} failed")
    raise typer.Exit(1 if report.failed else 0)


@ae_app.command("add")
def ae_add(
    ae_title: Annotated[str, typer.Argument(help="The peer's AE title (at most 16 characters).")],
    host: Annotated[str, typer.Argument(help="Host name or address the peer listens on.")],
    port: Annotated[int, typer.Argument(help="The peer's DICOM port.")],
    data_dir: DataDir = None,
    store: Annotated[bool, typer.Option("--store/--no-store", help="May send instances to the archive.")] = True,
    query: Annotated[bool, typer.Option("--query/--no-query", help="May query (C-FIND).")] = True,
    retrieve: Annotated[bool, typer.Option("--retrieve/--no-retrieve", help="May retrieve and be a C-MOVE destination.")] = True,
    description: Annotated[str, typer.Option(help="Free text, e.g. the device's location.")] = "",
) -> None:
    """Add or update a remote AE."""
    from pacs.index.models import AuditEvent, RemoteAE
    from pacs.index.repository import find_remote_ae

    title = ae_title.strip()
    if not title or len(title) > 16 or "\\" in title:
        console.print(f"[red]invalid AE title {ae_title!r}:[/] expected 1 to 16 characters without a backslash")
        raise typer.Exit(2)
    if not 0 < port < 65536:
        console.print(f"[red]invalid port {port}:[/] expected 1 to 65535")
        raise typer.Exit(2)
    with _services(data_dir) as services, services.db.session() as session:
        peer = find_remote_ae(session, title) or RemoteAE(ae_title=title)
        peer.host, peer.port, peer.description = host, port, description
        peer.may_store, peer.may_query, peer.may_retrieve = store, query, retrieve
        session.add(peer)
        session.add(AuditEvent(actor="cli", action="ae.add", target=title, detail=f"{host}:{port}"))
    console.print(f"remote AE {title} at {host}:{port}")


@ae_app.command("list")
def ae_list(data_dir: DataDir = None) -> None:
    """List the remote AEs."""
    from pacs.index.repository import list_remote_aes

    with _services(data_dir) as services, services.db.session() as session:
        table = Table("AE title", "host", "port", "store", "query", "retrieve", "description", box=None)
        for peer in list_remote_aes(session):
            yes = lambda flag: "yes" if flag else "no"  # noqa: E731
            table.add_row(peer.ae_title, peer.host, str(peer.port), yes(peer.may_store), yes(peer.may_query),
                          yes(peer.may_retrieve), peer.description)
        Console().print(table)


@ae_app.command("remove")
def ae_remove(ae_title: Annotated[str, typer.Argument(help="The AE title to forget.")], data_dir: DataDir = None) -> None:
    """Remove a remote AE."""
    from pacs.index.models import AuditEvent
    from pacs.index.repository import find_remote_ae

    with _services(data_dir) as services, services.db.session() as session:
        peer = find_remote_ae(session, ae_title)
        if peer is None:
            console.print(f"[red]no remote AE {ae_title!r}[/]")
            raise typer.Exit(1)
        session.delete(peer)
        session.add(AuditEvent(actor="cli", action="ae.remove", target=peer.ae_title))
    console.print(f"removed {ae_title}")


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Create or upgrade the index schema (SQLite or Postgres) with Alembic."""
    from pacs.index import migrate
    from pacs.index.database import Database

    settings = _settings(data_dir)
    db = Database.from_settings(settings)
    try:
        migrate.upgrade(db, revision)
        console.print(f"index at {db.describe()} is at revision {migrate.current_revision(db)}")
    except Exception as exc:
        console.print(f"[red]upgrade failed:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        db.dispose()


@db_app.command("current")
def db_current(data_dir: DataDir = None) -> None:
    """Print the index schema's revision and whether it is current."""
    from pacs.index import migrate
    from pacs.index.database import Database

    db = Database.from_settings(_settings(data_dir))
    try:
        current, head = migrate.current_revision(db), migrate.head_revision()
        print(f"{current or '(empty)'} (newest: {head})")
        raise typer.Exit(0 if current == head else 1)
    finally:
        db.dispose()


@storage_app.command("compact")
def storage_compact(
    data_dir: DataDir = None,
    all_: Annotated[bool, typer.Option("--all", help="Pack every landed object, however few.")] = False,
) -> None:
    """Pack landed objects into containers now (normally automatic)."""
    with _services(data_dir) as services:
        report = services.compactor.compact(force=all_, wait_for_lease=True)
    print(
        f"{report.objects_packed} objects ({report.bytes_packed / 1e6:.1f} MB) into {report.packs_written} packs; "
        f"{report.landing_files_removed} landing files removed, {report.orphans_removed} orphans, "
        f"{report.abandoned_packs_removed} abandoned packs"
    )
    for problem in report.unreadable:
        console.print(f"[red]unreadable:[/] {problem}")
    raise typer.Exit(1 if report.unreadable else 0)


@storage_app.command("verify")
def storage_verify(data_dir: DataDir = None) -> None:
    """Read every stored object back and check it against its SHA-256 (a scrub)."""
    from pacs.storage.scrub import scrub

    with _services(data_dir) as services:
        with _progress_bar("verifying") as update:
            report = scrub(services.db, services.objects, on_progress=update)
    for sop_uid, problem in report.problems:
        console.print(f"[red]{sop_uid}:[/] {problem}")
    print(f"{report.checked} objects checked, {len(report.problems)} problems")
    raise typer.Exit(1 if report.problems else 0)


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except PacsError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(1)


if __name__ == "__main__":  # python -m pacs.cli.main
    main()
