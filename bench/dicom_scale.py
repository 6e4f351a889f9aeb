"""DICOM at scale: study-level C-FIND against index size, and server memory through a large study.

    .venv/bin/python bench/dicom_scale.py [--quick] [--sizes N ...] [--index-url URL] [--only find|memory] [--keep]

Two measurements, each against ``pacs serve --workers 1`` started here on a
fresh data dir, with the dcmtk clients and helpers of ``bench/dicom_services.py``
(``TCP_NODELAY=1`` everywhere):

1. **C-FIND against index size.**  For each size (20,000, 200,000 and
   1,000,000 instances by default) a fresh index is migrated and bulk-loaded
   with SQLAlchemy Core (``insert(Table)`` with lists of 10,000 rows; no
   blobs: C-FIND never opens them).  Background: ~2 studies per patient
   (``PATIENT^000123``), 1-2 series per study (CT, CT+MR), 10 instances per
   series, study dates spread over 2005-2025, every ``num_*`` counter and
   ``modalities_in_study`` consistent, plausible container / offset / length /
   SHA-256 values.  The same planted rows go into every size, so each query
   matches the same studies whatever the size:

   * ``PatientID=PID-TARGET`` (exact; TARGET^ALICE, 3 studies),
   * ``PatientName=TARGET^*`` (wildcard prefix; ALICE and BOB, 5 studies),
   * ``StudyDate=20260110`` (single date, 10 planted studies; the background
     has no 2026 dates),
   * ``StudyInstanceUID=<one planted UID>`` (1 study),

   each returning StudyInstanceUID, StudyDate, PatientName, PatientID,
   ModalitiesInStudy and NumberOfStudyRelatedInstances.  Timed on ONE open
   association from a pynetdicom SCU in this process: 2 warm-up runs, then
   median and p95 of 20.  One ``findscu`` process per run of the PatientID
   query (median of 5: process + association + query) for comparison with
   ``bench/dicom_services.py``.  The statement the server runs (built with
   ``pacs.query``) is explained (``EXPLAIN QUERY PLAN`` on SQLite,
   ``EXPLAIN (ANALYZE, BUFFERS)`` on Postgres) and printed per size.

   The default index is the embedded SQLite file ``<data dir>/index.sqlite``;
   ``--index-url postgresql+psycopg2://...`` (``deploy/postgres.sh env``)
   runs the same on Postgres, in a scratch database ``<name>_scale`` that is
   created next to the named one for each size and dropped at the end.  SQLite
   gets no ANALYZE (the archive never runs one); Postgres is ANALYZEd after
   the load, as autovacuum would do shortly after it.

2. **Memory while a large study is stored and retrieved.**  Embedded data dir,
   one study of 64x64 CT instances in 10 series (1,000, then 10,000
   instances; each size on its own fresh server): one ``storescu +sd``
   association, then ``getscu`` (STUDY level) into a temp dir, then
   ``movescu`` to a ``storescp`` started here and registered with
   ``pacs ae add``.  The server's RSS (VmRSS summed over its process group)
   is sampled every 0.2 s; printed: RSS at start, peak during each phase,
   instances/s of each phase.  Memory is bounded when the 10,000 peak is not
   ~10x the 1,000 peak.

``--quick``: C-FIND at 2,000 and 20,000 instances, memory at 200 and 1,000.
Every process started here is stopped by its PID (its process group).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dicom_services import (  # noqa: E402  (also puts the repository root on sys.path)
    ENV,
    HOST,
    PACS_BIN,
    SCP_AET,
    Pacs,
    Procs,
    dir_bytes,
    find_cmd,
    free_port,
    run_clients,
    storescp,
    storescu,
    timed_runs,
    wait_port,
    write_files,
)

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from pacs.index import migrate  # noqa: E402
from pacs.index.database import Database  # noqa: E402
from pacs.index.models import Instance, Patient, Series, Study  # noqa: E402
from pacs.net.transport import REQUESTOR_HANDLERS, configure_pynetdicom_logging  # noqa: E402
from pacs.query.identifiers import InformationModel, parse_identifier, response_plan  # noqa: E402
from pacs.synthetic import SeriesSpec, make_series, uid  # noqa: E402

AET = "PACS"
RUNS = 20
WARMUP_RUNS = 2
FINDSCU_RUNS = 5
MAX_FIND_RESULTS = 10_000  # the server's default limit, part of the statement it runs
BATCH_ROWS = 10_000
INSTANCES_PER_SERIES = 10
RSS_INTERVAL_S = 0.2

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
UID_ROOT = "1.2.826.0.1.3680043.10.1484.77.20261121"  # the project's test arc; bulk-loaded rows only


# --------------------------------------------------------------------------- the index, bulk-loaded

@dataclass(frozen=True)
class PlantedStudy:
    key: str
    study_date: str
    modalities: tuple[str, ...]  # one series of 10 instances per entry


@dataclass(frozen=True)
class PlantedPatient:
    patient_id: str
    patient_name: str
    studies: tuple[PlantedStudy, ...]


# The same rows in every index size: the matches of each query never change.
PLANTED = (
    PlantedPatient("PID-TARGET", "TARGET^ALICE", (
        PlantedStudy("alice-1", "20260105", ("CT",)),
        PlantedStudy("alice-2", "20260106", ("CT", "MR")),
        PlantedStudy("alice-3", "20260107", ("MR",)),
    )),
    PlantedPatient("PID-TARGET-B", "TARGET^BOB", (
        PlantedStudy("bob-1", "20260108", ("CT",)),
        PlantedStudy("bob-2", "20260109", ("CT", "MR")),
    )),
    *(PlantedPatient(f"PID-DAY-{p}", f"PLANTED^DAY{p}", (
        PlantedStudy(f"day-{p}-a", "20260110", ("CT",)),
        PlantedStudy(f"day-{p}-b", "20260110", ("CT", "MR")),
    )) for p in range(5)),
)
PLANTED_INSTANCES = sum(len(s.modalities) * INSTANCES_PER_SERIES for p in PLANTED for s in p.studies)
TARGET_STUDY_UID = f"{UID_ROOT}.9.2"  # alice-2: planted studies are numbered from 1 under .9


@dataclass(frozen=True)
class FindQuery:
    label: str
    matching: dict[str, str]
    expected_matches: int


RETURN_KEYS = ("StudyInstanceUID", "StudyDate", "PatientName", "PatientID", "ModalitiesInStudy",
               "NumberOfStudyRelatedInstances")
QUERIES = (
    FindQuery("PatientID=PID-TARGET", {"PatientID": "PID-TARGET"}, 3),
    FindQuery("PatientName=TARGET^*", {"PatientName": "TARGET^*"}, 5),
    FindQuery("StudyDate=20260110", {"StudyDate": "20260110"}, 10),
    FindQuery("StudyInstanceUID=<1>", {"StudyInstanceUID": TARGET_STUDY_UID}, 1),
)


@dataclass
class LoadReport:
    patients: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    seconds: float = 0.0


@dataclass
class _Buffers:
    patients: list[dict] = field(default_factory=list)
    studies: list[dict] = field(default_factory=list)
    series: list[dict] = field(default_factory=list)
    instances: list[dict] = field(default_factory=list)


class IndexLoader:
    """Writes index rows with explicit primary keys, in batches, parents before children."""

    FIRST_DATE = date(2005, 1, 1)
    DAYS = (date(2025, 12, 31) - date(2005, 1, 1)).days + 1

    def __init__(self, db: Database) -> None:
        self.db = db
        self.report = LoadReport()
        self.buffers = _Buffers()
        self.stored_at = datetime(2026, 1, 15, 8, 0, tzinfo=timezone.utc)

    def load(self, total_instances: int) -> LoadReport:
        started = time.perf_counter()
        background = max(0, total_instances - PLANTED_INSTANCES)
        p = 0
        while self.report.instances + len(self.buffers.instances) < background:
            # 1, 2 or 3 studies (2 on average); 1 or 2 series of 10 per study
            studies = []
            for _ in range(1 + p % 3):
                s = self.report.studies + len(self.buffers.studies) + len(studies)
                day = self.FIRST_DATE + timedelta(days=(s * 2_654_435_761) % self.DAYS)
                studies.append((f"{UID_ROOT}.1.{s}", day.strftime("%Y%m%d"), ("CT", "MR")[: 1 + s % 2]))
            self._add_patient(f"PID{p:07d}", f"PATIENT^{p:06d}", f"{1930 + p % 80}{1 + p % 12:02d}{1 + p % 28:02d}",
                              "FM"[p % 2], studies)
            p += 1
            if len(self.buffers.instances) >= BATCH_ROWS:
                self._flush()
        planted = 0
        for patient in PLANTED:
            studies = []
            for study in patient.studies:
                planted += 1
                studies.append((f"{UID_ROOT}.9.{planted}", study.study_date, study.modalities))
            self._add_patient(patient.patient_id, patient.patient_name, "19800101", "F", studies)
        self._flush()
        self._after_load()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _add_patient(self, patient_id: str, name: str, birth_date: str, sex: str,
                     studies: list[tuple[str, str, tuple[str, ...]]]) -> None:
        b = self.buffers
        patient_pk = self.report.patients + len(b.patients) + 1
        n_series = n_instances = 0
        for study_uid, study_date, modalities in studies:
            study_pk = self.report.studies + len(b.studies) + 1
            for k, modality in enumerate(modalities):
                series_pk = self.report.series + len(b.series) + 1
                series_uid = f"{study_uid}.{k + 1}"
                b.series.append(dict(
                    id=series_pk, study_fk=study_pk, series_instance_uid=series_uid, modality=modality,
                    series_number=k + 1, series_description="AXIAL 1mm" if modality == "CT" else "T1 AX",
                    body_part_examined="CHEST", series_date=study_date, series_time="101500.000000",
                    frame_of_reference_uid=f"{study_uid}.0", num_instances=INSTANCES_PER_SERIES,
                    created_at=self.stored_at, updated_at=self.stored_at,
                ))
                self._add_instances(series_pk, series_uid, modality)
            n_series += len(modalities)
            n_instances += len(modalities) * INSTANCES_PER_SERIES
            b.studies.append(dict(
                id=study_pk, patient_fk=patient_pk, study_instance_uid=study_uid, study_date=study_date,
                study_time=f"{8 + study_pk % 10:02d}{study_pk % 60:02d}00.000000",
                accession_number=f"ACC{study_pk:09d}", study_id=str(study_pk % 100_000),
                study_description="CT CHEST" if modalities == ("CT",) else "CT+MR FOLLOW-UP",
                referring_physician_name="SMITH^JOHN", modalities_in_study="\\".join(sorted(modalities)),
                num_series=len(modalities), num_instances=len(modalities) * INSTANCES_PER_SERIES,
                created_at=self.stored_at, updated_at=self.stored_at,
            ))
        b.patients.append(dict(
            id=patient_pk, patient_id=patient_id, issuer_of_patient_id="", patient_name=name,
            patient_birth_date=birth_date, patient_sex=sex, num_studies=len(studies), num_series=n_series,
            num_instances=n_instances, created_at=self.stored_at,
        ))

    def _add_instances(self, series_pk: int, series_uid: str, modality: str) -> None:
        b = self.buffers
        for i in range(INSTANCES_PER_SERIES):
            instance_pk = self.report.instances + len(b.instances) + 1
            sop_uid = f"{series_uid}.{i + 1}"
            length = 526_000 + instance_pk % 4096
            b.instances.append(dict(
                id=instance_pk, series_fk=series_pk, sop_instance_uid=sop_uid,
                sop_class_uid=CT_IMAGE if modality == "CT" else MR_IMAGE, instance_number=i + 1,
                rows=512, columns=512, number_of_frames=None, transfer_syntax_uid=EXPLICIT_VR_LE,
                container=f"packs/2026/01/pack-{instance_pk // 480:08d}.pack",
                offset=(instance_pk % 480) * 530_000, length=length,
                sha256=hashlib.sha256(sop_uid.encode()).hexdigest(), packed=True, source_ae="CT01",
                stored_at=self.stored_at,
            ))

    def _flush(self) -> None:
        b = self.buffers
        with self.db.transaction() as conn:
            for table, rows in ((Patient, b.patients), (Study, b.studies), (Series, b.series),
                                (Instance, b.instances)):
                if rows:
                    conn.execute(insert(table), rows)
        self.report.patients += len(b.patients)
        self.report.studies += len(b.studies)
        self.report.series += len(b.series)
        self.report.instances += len(b.instances)
        self.buffers = _Buffers()

    def _after_load(self) -> None:
        if self.db.dialect != "postgresql":
            return
        with self.db.transaction() as conn:
            # Explicit keys were inserted: move the sequences past them.
            for table in ("patients", "studies", "series", "instances"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"(SELECT max(id) FROM {table}))"))
        with self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))


@contextmanager
def fresh_index(index_url: str | None, data_dir: Path) -> Iterator[str]:
    """The URL of an empty, migrated index: SQLite in ``data_dir``, or a scratch Postgres database."""
    if index_url is None:
        url = f"sqlite:///{data_dir / 'index.sqlite'}"
        yield _migrated(url)
        return
    server = make_url(index_url)
    scratch = server.set(database=f"{server.database}_scale")
    admin = Database(server.render_as_string(hide_password=False))
    try:
        def recreate(drop_only: bool = False) -> None:
            with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch.database}"'))
                if not drop_only:
                    conn.execute(text(f'CREATE DATABASE "{scratch.database}"'))

        recreate()
        try:
            yield _migrated(scratch.render_as_string(hide_password=False))
        finally:
            recreate(drop_only=True)
    finally:
        admin.dispose()


def _migrated(url: str) -> str:
    db = Database(url)
    try:
        migrate.upgrade(db)
    finally:
        db.dispose()
    return url


def bulk_load(url: str, total_instances: int) -> LoadReport:
    db = Database(url)
    try:
        if db.dialect == "sqlite":
            # The loader's own connection only: the server opens the file with the archive's pragmas.
            with db.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA synchronous=OFF")
                conn.commit()
        return IndexLoader(db).load(total_instances)
    finally:
        db.dispose()


# --------------------------------------------------------------------------- C-FIND

def identifier(query: FindQuery) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, query.matching.get(keyword, ""))
    return ds


def explain(url: str, query: FindQuery) -> list[str]:
    """The plan of the statement ``pacs serve`` runs for ``query`` (same builder, same limit)."""
    parsed = parse_identifier(identifier(query), InformationModel.STUDY_ROOT)
    statement = response_plan(parsed).statement().limit(MAX_FIND_RESULTS)
    db = Database(url)  # the archive's engine: SQLite gets its pragmas (case_sensitive_like among them)
    try:
        compiled = statement.compile(dialect=db.engine.dialect)
        with db.engine.connect() as conn:
            if db.dialect == "sqlite":
                params = tuple(compiled.params[name] for name in compiled.positiontup)
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params).all()
                return [f"{'  ' * _depth(rows, r)}{r[3]}" for r in rows]
            rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}", compiled.params).all()
            return [r[0] for r in rows]
    finally:
        db.dispose()


def _depth(rows: list, row: tuple) -> int:
    parents = {r[0]: r[1] for r in rows}
    depth, node = 0, row[1]
    while node in parents:
        depth, node = depth + 1, parents[node]
    return depth


class FindAssociation:
    """One association kept open for Study Root C-FINDs."""

    def __init__(self, port: int) -> None:
        self.ae = AE(ae_title="SCALEFIND")
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.assoc = self.ae.associate(HOST, port, ae_title=AET, evt_handlers=REQUESTOR_HANDLERS)
        if not self.assoc.is_established:
            raise ConnectionError(f"no association with {AET} on port {port}")

    def find(self, ds: Dataset) -> list[Dataset]:
        matches = []
        for status, ident in self.assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
            code = int(status.Status) if "Status" in status else None
            if code in (0xFF00, 0xFF01):
                matches.append(ident)
            elif code != 0x0000:
                raise RuntimeError(f"C-FIND failed: status {code!r}")
        return matches

    def close(self) -> None:
        self.assoc.release()
        self.ae.shutdown()


def median_p95_ms(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    p95 = samples[min(len(samples) - 1, -(-95 * len(samples) // 100) - 1)]  # nearest rank
    return statistics.median(samples) * 1e3, p95 * 1e3


def pacs_env(data_dir: Path, port: int, index_url: str | None) -> list[str]:
    """``env`` arguments giving ``pacs`` exactly these settings (none inherited from the caller's PACS_*)."""
    args = ["env"]
    for name in sorted(ENV):
        if name.startswith("PACS_"):
            args += ["-u", name]
    args += [f"PACS_DATA_DIR={data_dir}", f"PACS_DICOM_PORT={port}", f"PACS_AET={AET}", "PACS_LOG_LEVEL=WARNING"]
    if index_url is not None:
        args.append(f"PACS_INDEX_URL={index_url}")
    return args


def start_server(procs: Procs, data_dir: Path, index_url: str | None, log: Path):
    port = free_port()
    proc = procs.start([*pacs_env(data_dir, port, index_url), PACS_BIN, "serve", "--workers", "1"], log)
    wait_port(port, proc, timeout=120)
    subprocess.run(["echoscu", "-aec", AET, HOST, str(port)], env=ENV, check=True, capture_output=True)
    return proc, port


@dataclass
class FindResult:
    size: int
    load: LoadReport
    db_mb: float | None
    times_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    findscu_ms: tuple[float, float] = (0.0, 0.0)
    plans: dict[str, list[str]] = field(default_factory=dict)


def bench_find_size(size: int, index_url: str | None, runs: int, procs: Procs, tmp: Path) -> FindResult:
    data_dir = tmp / f"find-{size}"
    data_dir.mkdir()
    with fresh_index(index_url, data_dir) as url:
        load = bulk_load(url, size)
        db_file = data_dir / "index.sqlite"
        db_mb = db_file.stat().st_size / 2**20 if db_file.exists() else None
        result = FindResult(size, load, db_mb)
        print(f"  {size:,}: loaded {load.instances:,} instances, {load.series:,} series, {load.studies:,} studies, "
              f"{load.patients:,} patients in {load.seconds:.1f}s", flush=True)
        for query in QUERIES:
            result.plans[query.label] = explain(url, query)
        proc, port = start_server(procs, data_dir, None if index_url is None else url, tmp / f"serve-find-{size}.log")
        try:
            client = FindAssociation(port)
            try:
                for query in QUERIES:
                    ds = identifier(query)
                    got = client.find(ds)
                    if len(got) != query.expected_matches:
                        raise RuntimeError(f"{query.label}: {len(got)} matches at {size:,}, "
                                           f"expected {query.expected_matches}")
                    for _ in range(WARMUP_RUNS - 1):
                        client.find(ds)
                    samples = []
                    for _ in range(runs):
                        started = time.perf_counter()
                        client.find(ds)
                        samples.append(time.perf_counter() - started)
                    result.times_ms[query.label] = median_p95_ms(samples)
            finally:
                client.close()
            keys = [f"{k}={QUERIES[0].matching[k]}" if k in QUERIES[0].matching else k for k in RETURN_KEYS]
            result.findscu_ms = timed_runs(find_cmd(AET, port, keys), FINDSCU_RUNS)
        finally:
            procs.stop(proc)
    return result


def find_report(results: list[FindResult], backend: str) -> str:
    lines = []
    for r in results:
        db = f", index file {r.db_mb:,.0f} MiB" if r.db_mb is not None else ""
        lines.append(f"\n### {r.size:,} instances ({backend}): {r.load.patients:,} patients, {r.load.studies:,} "
                     f"studies, {r.load.series:,} series, {r.load.instances:,} instances; bulk load "
                     f"{r.load.seconds:.1f} s ({r.load.instances / r.load.seconds:,.0f} instances/s){db}\n")
        lines.append("| query (STUDY level, one open association) | matches | median ms | p95 ms |")
        lines.append("| --- | --- | --- | --- |")
        for q in QUERIES:
            med, p95 = r.times_ms[q.label]
            lines.append(f"| {q.label} | {q.expected_matches} | {med:.1f} | {p95:.1f} |")
        med, p95 = r.findscu_ms
        lines.append(f"| findscu process, {QUERIES[0].label} (median of {FINDSCU_RUNS}) | "
                     f"{QUERIES[0].expected_matches} | {med:.1f} | {p95:.1f} |")
    if len(results) > 1:
        first, last = results[0], results[-1]
        lines.append(f"\n### p50 ratio {last.size:,} / {first.size:,} instances ({backend})\n")
        lines.append("| query | " + " | ".join(f"p50 {r.size:,}" for r in results) + " | ratio | within 2x |")
        lines.append("| --- | " + " | ".join("---" for _ in results) + " | --- | --- |")
        for q in QUERIES:
            ratio = last.times_ms[q.label][0] / first.times_ms[q.label][0]
            lines.append(f"| {q.label} | " + " | ".join(f"{r.times_ms[q.label][0]:.1f}" for r in results)
                         + f" | {ratio:.2f} | {'yes' if ratio <= 2 else 'NO'} |")
        ratio = last.findscu_ms[0] / first.findscu_ms[0]
        lines.append(f"| findscu process, {QUERIES[0].label} | " + " | ".join(f"{r.findscu_ms[0]:.1f}" for r in results)
                     + f" | {ratio:.2f} | {'yes' if ratio <= 2 else 'NO'} |")
    for r in results:
        lines.append(f"\nplans at {r.size:,} instances:")
        for q in QUERIES:
            lines.append(f"  {q.label}:")
            lines += [f"    {step}" for step in r.plans[q.label]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- memory

def group_rss_kib(pgid: int) -> int:
    """VmRSS summed over the processes of a process group (kiB)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            if int(stat[stat.rindex(b")") + 2:].split()[2]) != pgid:  # fields after comm: state ppid pgrp
                continue
            with open(f"/proc/{entry.name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue  # the process ended between the listing and the read
    return total


class RssSampler:
    """Samples a process group's RSS every ``interval_s`` in a thread; peaks over time windows."""

    def __init__(self, pgid: int, interval_s: float = RSS_INTERVAL_S) -> None:
        self.pgid, self.interval_s = pgid, interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), group_rss_kib(self.pgid)))
            self._stop.wait(self.interval_s)

    def peak_mib(self, start: float, end: float) -> float:
        window = [kib for t, kib in self.samples if start <= t <= end]
        return max(window) / 1024 if window else float("nan")


@dataclass
class MemoryResult:
    instances: int
    mb: float
    start_mib: float = 0.0
    end_mib: float = 0.0
    phases: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # seconds, peak MiB, received
    notes: list[str] = field(default_factory=list)


def make_study(folder: Path, instances: int) -> tuple[str, int]:
    """``instances`` 64x64 CT instances of one study in 10 series, written to ``folder``."""
    study_key = f"scale-{instances}"
    per_series = instances // 10

    def blobs() -> Iterator[bytes]:
        for k in range(10):
            yield from make_series(SeriesSpec(patient_id="SCALE", patient_name="SCALE^STUDY", study_key=study_key,
                                              series_key=f"{study_key}-{k}", series_number=k + 1, rows=64,
                                              columns=64, count=per_series))

    n, size = write_files(folder, blobs())
    return uid(study_key), size


def study_instances(port: int, study_uid: str) -> int:
    client = FindAssociation(port)
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study_uid
        ds.NumberOfStudyRelatedInstances = ""
        got = client.find(ds)
        return int(got[0].NumberOfStudyRelatedInstances) if got else 0
    finally:
        client.close()


def run_move(cmd: list[str]) -> tuple[float, str | None]:
    """Run ``movescu -v``; (wall seconds, a note) where the move succeeded but the association ended badly.

    A C-MOVE longer than the archive's network timeout (60 s) completes (all
    sub-operations and a final Success) but the archive then aborts the
    association instead of accepting the release: pynetdicom restarts its
    idle timer on received PDUs only, and a C-MOVE requestor sends none
    while the sub-operations travel over the other association.
    """
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    out = proc.stdout.decode(errors="replace").splitlines()
    final = [ln for ln in out if "Final Move Response" in ln]
    bad = [ln for ln in out if ln.startswith(("E:", "F:"))]
    if not final or "(Success)" not in final[-1]:
        raise RuntimeError(f"C-MOVE: movescu rc={proc.returncode}\n" + "\n".join((final + bad)[:15]))
    if proc.returncode != 0 or bad:
        return seconds, (f"final C-MOVE response Success after {seconds:.0f} s, then movescu rc={proc.returncode}: "
                         + " / ".join(ln[3:].strip() for ln in bad))
    return seconds, None


def bench_memory_size(instances: int, procs: Procs, tmp: Path) -> MemoryResult:
    folder = tmp / f"study-{instances}"
    study_uid, size = make_study(folder, instances)
    result = MemoryResult(instances, size / 1e6)
    data_dir = tmp / f"memory-{instances}"
    data_dir.mkdir()
    moved, got_dir = tmp / f"moved-{instances}", tmp / f"got-{instances}"
    got_dir.mkdir()
    with storescp(procs, moved) as scp_port:
        subprocess.run([*pacs_env(data_dir, 0, None), PACS_BIN, "ae", "add", SCP_AET, HOST, str(scp_port)],
                       check=True, capture_output=True)
        proc, port = start_server(procs, data_dir, None, tmp / f"serve-memory-{instances}.log")
        try:
            with RssSampler(proc.pid) as rss:
                time.sleep(1.0)
                result.start_mib = group_rss_kib(proc.pid) / 1024
                level = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
                phases = (
                    ("C-STORE (storescu, 1 association)", storescu(AET, port, folder), None),
                    ("C-GET (getscu, STUDY level)",
                     ["getscu", "-aet", "GETSCU", "-aec", AET, *level, "-od", str(got_dir), HOST, str(port)], got_dir),
                    ("C-MOVE (movescu to storescp)",
                     ["movescu", "-v", "-aet", "MOVESCU", "-aec", AET, "-aem", SCP_AET, *level, HOST, str(port)],
                     moved),
                )
                for label, cmd, received_dir in phases:
                    started = time.monotonic()
                    if cmd[0] == "movescu":
                        seconds, note = run_move(cmd)
                        if note:
                            result.notes.append(f"{label}: {note}")
                    else:
                        seconds = run_clients([cmd], label)
                    peak = rss.peak_mib(started, time.monotonic())
                    if received_dir is None:
                        received = study_instances(port, study_uid)
                    else:
                        received = dir_bytes(received_dir)[0]
                    if received != instances:
                        raise RuntimeError(f"{label}: {received} of {instances} instances")
                    result.phases[label] = (seconds, peak, received)
                    print(f"  {instances:,}: {label} {seconds:.1f}s, peak RSS {peak:.0f} MiB", flush=True)
                result.end_mib = group_rss_kib(proc.pid) / 1024
        finally:
            procs.stop(proc)
    for d in (folder, moved, got_dir):
        shutil.rmtree(d, ignore_errors=True)
    return result


def memory_report(results: list[MemoryResult]) -> str:
    lines = ["| study | RSS at start MiB | phase | instances/s | peak RSS MiB |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        for label, (seconds, peak, _) in r.phases.items():
            lines.append(f"| {r.instances:,} x 64x64 CT ({r.mb:.0f} MB) | {r.start_mib:.0f} | {label} | "
                         f"{r.instances / seconds:.0f} | {peak:.0f} |")
        lines.append(f"| {r.instances:,} | | RSS after the three phases | | {r.end_mib:.0f} |")
    for r in results:
        lines += [f"\n{r.instances:,}: {note}" for note in r.notes]
    if len(results) > 1:
        small, large = results[0], results[-1]
        lines.append(f"\npeak RSS, {large.instances:,} / {small.instances:,} instances "
                     f"({large.instances / small.instances:.0f}x the data):")
        for label in large.phases:
            p_small, p_large = small.phases[label][1], large.phases[label][1]
            growth_small, growth_large = p_small - small.start_mib, p_large - large.start_mib
            lines.append(f"  {label}: {p_large:.0f} / {p_small:.0f} MiB = {p_large / p_small:.2f}x; above start: "
                         f"{growth_large:.0f} / {growth_small:.0f} MiB")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="C-FIND at 2,000 and 20,000; memory at 200 and 1,000")
    parser.add_argument("--sizes", type=int, nargs="+", help="index sizes in instances (default 20000 200000 1000000)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", help="study sizes in instances (default 1000 10000)")
    parser.add_argument("--index-url", help="a Postgres URL: the C-FIND part runs on <database>_scale there")
    parser.add_argument("--only", choices=["find", "memory"], help="run one of the two parts")
    parser.add_argument("--runs", type=int, default=RUNS, help=f"timed C-FINDs per query (default {RUNS})")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (indexes, logs)")
    args = parser.parse_args()
    sizes = args.sizes or ([2_000, 20_000] if args.quick else [20_000, 200_000, 1_000_000])
    memory_sizes = args.memory_sizes or ([200, 1_000] if args.quick else [1_000, 10_000])
    if args.index_url and not args.index_url.startswith("postgresql"):
        parser.error(f"--index-url: expected a postgresql URL, got {args.index_url!r}")
    configure_pynetdicom_logging("WARNING")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="dicom-scale-"))
    procs = Procs()
    backend = "Postgres" if args.index_url else "SQLite"
    find_results: list[FindResult] = []
    memory_results: list[MemoryResult] = []
    try:
        if args.only in (None, "find"):
            print(f"C-FIND against index size ({backend}):", flush=True)
            for size in sizes:
                find_results.append(bench_find_size(size, args.index_url, args.runs, procs, tmp))
        if args.only in (None, "memory"):
            print("memory through one study (embedded default):", flush=True)
            for n in memory_sizes:
                memory_results.append(bench_memory_size(n, procs, tmp))
    finally:
        procs.stop_all()
        elapsed = time.perf_counter() - started
        print(f"\nDICOM at scale{' (--quick)' if args.quick else ''}: {platform.node()}, {os.cpu_count()} cores, "
              f"loopback, TCP_NODELAY=1; {Pacs.version()}; total {elapsed:.0f} s")
        if find_results:
            print(f"\n## C-FIND at STUDY level against index size ({backend}, pacs serve --workers 1); "
                  f"{args.runs} runs after {WARMUP_RUNS} warm-up")
            print(find_report(find_results, backend))
        if memory_results:
            print("\n## pacs serve --workers 1 RSS (process group) through one study, "
                  f"sampled every {RSS_INTERVAL_S} s\n")
            print(memory_report(memory_results))
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
