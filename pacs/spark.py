"""Spark plumbing shared by the processing jobs (reconstruction, denoising).

* :func:`check_master` validates a master URL and, for a standalone master,
  that something answers on its port, so a typo or a stopped cluster fails at
  once with a clear message instead of after Spark's registration retries.
* :func:`spark_session` gives the process's ``SparkSession`` for a master
  (``local[*]``, ``local[N]``, ``spark://HOST:PORT``, ...), started with the
  settings the archive's jobs need, and stops it afterwards if it started it.
* :func:`job_progress` runs the Spark jobs of a block under one job group and
  reports ``progress(done_tasks, total_tasks)`` from ``sc.statusTracker()``.

pyspark is imported inside the functions: ``pacs`` must stay importable (and
quick to import) without starting or even loading Spark.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pacs.errors import SparkUnavailable

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    from pacs.settings import SparkSettings

__all__ = [
    "LOCAL_MASTER",
    "build_spark_session",
    "check_master",
    "job_progress",
    "launched_by_spark_submit",
    "spark_session",
    "task_error_message",
]

log = logging.getLogger(__name__)

LOCAL_MASTER = "local[*]"
# Driver-side log4j2 configuration: warnings only, and not the one Spark logs
# for every task carrying its own data (reconstruction tasks carry projection bands).
LOG4J2_PROPERTIES = Path(__file__).with_name("spark-log4j2.properties")

_LOCAL = re.compile(r"local(\[(\*|[1-9]\d*)(,[0-9]+)?\])?")
_LOCAL_CLUSTER = re.compile(r"local-cluster\[[1-9]\d*,\s*[1-9]\d*,\s*[1-9]\d*\]")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")
_EXPECTED_MASTER = "local, local[*], local[N], spark://HOST:PORT[,HOST:PORT...], yarn or k8s://URL"


def check_master(master: str, *, connect_timeout_s: float = 3.0) -> str:
    """Validate a Spark master URL; for ``spark://`` also that a master listens there.

    Returns the URL stripped of surrounding blanks.  Raises ``ValueError`` for
    a malformed URL and :class:`~pacs.errors.SparkUnavailable` when no
    standalone master accepts a TCP connection at any of the given addresses.
    """
    text = master.strip() if isinstance(master, str) else master
    if not isinstance(text, str) or not text:
        raise ValueError(f"Spark master: expected {_EXPECTED_MASTER}, got {master!r}")
    if _LOCAL.fullmatch(text) or _LOCAL_CLUSTER.fullmatch(text) or text == "yarn":
        return text
    if text.startswith("k8s://") and len(text) > len("k8s://"):
        return text
    if not text.startswith("spark://"):
        raise ValueError(f"Spark master: expected {_EXPECTED_MASTER}, got {master!r}")
    addresses = text[len("spark://"):].split(",")
    parsed = [_HOST_PORT.fullmatch(a.strip()) for a in addresses]
    if not all(parsed) or not all(0 < int(m["port"]) < 65536 for m in parsed):  # type: ignore[index]
        raise ValueError(f"Spark master: expected spark://HOST:PORT with a port in 1..65535, got {master!r}")
    errors = []
    for match in parsed:
        host, port = match["host"].strip("[]"), int(match["port"])  # type: ignore[index]
        try:
            with socket.create_connection((host, port), timeout=connect_timeout_s):
                return text
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")
    raise SparkUnavailable(
        f"no Spark master answers at {text} ({'; '.join(errors)}); start one with `deploy/spark.sh up` "
        f"or run in local mode (--master {LOCAL_MASTER})"
    )


def launched_by_spark_submit() -> bool:
    """True in a Python driver that ``spark-submit`` started (its JVM is already up)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _prepare_environment() -> None:
    """Environment the Spark launcher and the Python workers read (kept where already set).

    * ``SPARK_LOCAL_IP``: the host name may resolve to an address Spark cannot
      use; loopback works for local mode and a cluster on this machine (a
      driver serving executors on other hosts sets it to its own address).
    * ``PYSPARK_PYTHON`` / ``PYSPARK_DRIVER_PYTHON``: this interpreter, so that
      executors import the same packages (torch, reconstruct, denoise).
    """
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def session_config(settings: SparkSettings | None = None) -> dict[str, str]:
    """The Spark configuration every job of the archive runs with."""
    from pacs.settings import SparkSettings

    spark = settings or SparkSettings()
    return {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.memory": spark.driver_memory,
        "spark.driver.maxResultSize": spark.max_result_size,
        "spark.executor.memory": spark.executor_memory,
        "spark.rpc.message.maxSize": str(spark.max_task_mb),
        # Rows that carry images: a small Arrow batch bounds the memory of a
        # mapInPandas/predict_batch_udf batch (the default is 10,000 rows).
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(spark.arrow_batch_rows),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.driver.extraJavaOptions": f"-Dlog4j.configurationFile=file:{LOG4J2_PROPERTIES}",
    }


def build_spark_session(
    master: str | None = LOCAL_MASTER,
    app_name: str = "pacs",
    *,
    settings: SparkSettings | None = None,
    config: Mapping[str, str] | None = None,
) -> SparkSession:
    """The process's SparkSession, created if none runs.

    ``master=None`` keeps the master that ``spark-submit`` chose (or pyspark's
    default, ``local[*]``).  A session already running for another master is
    an error: a process has one SparkContext, and silently using it would run
    the job somewhere else than asked.
    """
    if master is not None:
        master = check_master(master)
    _prepare_environment()
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    if master is None and launched_by_spark_submit() and SparkContext._active_spark_context is None:
        # spark-submit's JVM is up and knows its --master: fail fast if nobody serves it
        # (started here, a JVM would miss the driver options of session_config).
        SparkContext._ensure_initialized()
        chosen = SparkConf().get("spark.master", None)
        if chosen:
            check_master(chosen)

    active = SparkContext._active_spark_context
    if active is not None:
        if master is not None and active.master != master:
            raise ValueError(
                f"Spark master: expected {master!r}, but this process already runs a SparkContext "
                f"for {active.master!r}; stop it first"
            )
        return SparkSession.builder.getOrCreate()
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    wanted = session_config(settings)
    if launched_by_spark_submit():  # what the spark-submit command line says wins over the settings
        given = SparkConf()
        wanted = {key: value for key, value in wanted.items() if not given.contains(key)}
    for key, value in {**wanted, **(config or {})}.items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # the JVM's reasons come back as Py4J/pyspark errors of many types
        raise SparkUnavailable(f"cannot start Spark for master {master or 'from spark-submit'}: "
                               f"{_first_line(exc)}") from exc
    session.sparkContext.setLogLevel("WARN")
    return session


@contextmanager
def spark_session(
    master: str | None = LOCAL_MASTER,
    app_name: str = "pacs",
    *,
    settings: SparkSettings | None = None,
    config: Mapping[str, str] | None = None,
) -> Iterator[SparkSession]:
    """:func:`build_spark_session` as a context: stops the session on exit if it started it."""
    from pyspark import SparkContext

    started = SparkContext._active_spark_context is None
    session = build_spark_session(master, app_name, settings=settings, config=config)
    try:
        yield session
    finally:
        if started:
            session.stop()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def task_error_message(exc: BaseException) -> str:
    """The useful line of an error raised by a Spark action.

    A Python exception in a task comes back wrapped (``PythonException`` with
    the worker's traceback, or a ``Py4JJavaError`` holding it); the last
    ``SomeError: message`` line of the traceback is what the user needs.
    """
    text = str(exc)
    found = re.findall(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit)[^\n]*)$", text, flags=re.M)
    lines = [line.strip() for line in found if not line.lstrip().startswith(("py4j.", "org.apache"))]
    return lines[-1] if lines else _first_line(exc)


ProgressCallback = Callable[[int, int], None]


def _group_tasks(sc: SparkContext, group: str) -> tuple[int, int]:
    """(completed, total) tasks over every stage of every job in a job group."""
    tracker = sc.statusTracker()
    done = total = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        if job is None:
            continue
        for stage_id in job.stageIds:
            stage = tracker.getStageInfo(stage_id)
            if stage is not None:
                done += stage.numCompletedTasks
                total += stage.numTasks
    return done, total


@contextmanager
def job_progress(
    sc: SparkContext,
    progress: ProgressCallback | None,
    *,
    description: str,
    expected_tasks: int | None = None,
    interval_s: float = 0.5,
) -> Iterator[str]:
    """Run the block's Spark jobs under one job group and report their tasks.

    A thread polls ``sc.statusTracker()`` every ``interval_s`` and calls
    ``progress(done_tasks, total_tasks)`` when the numbers change
    (``expected_tasks`` gives the total before the first job is submitted),
    and once more when the block ends normally.  The job group is also what
    ``sc.cancelJobGroup`` takes; it is yielded.
    """
    group = f"pacs-{uuid.uuid4().hex[:12]}"
    sc.setJobGroup(group, description)
    stop = threading.Event()
    last: tuple[int, int] | None = None

    def report() -> None:
        nonlocal last
        done, total = _group_tasks(sc, group)
        total = max(total, expected_tasks or 0)
        if (done, total) != last:
            last = (done, total)
            progress(done, total)  # type: ignore[misc]

    def poll_once() -> None:
        try:
            report()
        except Exception:  # progress is advisory: never let it break the job
            log.debug("Spark progress poll failed", exc_info=True)

    def poll() -> None:
        while not stop.wait(interval_s):
            poll_once()

    thread = None
    if progress is not None:
        if expected_tasks:
            last = (0, expected_tasks)
            progress(0, expected_tasks)
        thread = threading.Thread(target=poll, name=f"spark-progress-{group}", daemon=True)
        thread.start()
    try:
        yield group
        if thread is not None:
            stop.set()
            thread.join()
            poll_once()
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        sc.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
        sc.setLocalProperty("spark.job.description", None)  # type: ignore[arg-type]
