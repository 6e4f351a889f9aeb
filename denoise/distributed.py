"""Data-parallel U-Net training on Spark: ``pacs denoise train --spark-processes N``.

``pyspark.ml.torch.distributor.TorchDistributor`` (``local_mode=False``)
starts ``N`` Spark barrier tasks; each runs ``torchrun`` for one node of one
process, which calls :func:`train_rank` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set (rank = the task's partition, master
= the host of task 0 and a free port it picked, agreed through
``BarrierTaskContext.allGather``).  :func:`train_rank` joins a gloo process
group (NCCL on CUDA) and runs :func:`denoise.train.train`, which then trains
one ``DistributedDataParallel`` replica per rank (see that module).

The driver simulates the training and validation pairs into ``cache_dir``
before Spark starts (so the tasks only load them), checks a ``resume`` the
way ``train`` will, and follows the run by polling ``out_dir/history.json``,
which rank 0 replaces after each epoch.  ``out_dir`` and ``cache_dir`` must be
the same folders on the driver and on every executor: one machine (local
mode, or a standalone cluster on it) or a shared file system.

Each task runs torch with ``spark.task.cpus`` threads (1 by default), so
``N`` processes need ``N`` task slots: ``local[N]`` or more, or ``N`` cores of
a cluster's workers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .dataset import PatchSampler, build_pair_set
from .train import EpochRecord, TrainConfig, load_resume_state, train

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pacs.settings import SparkSettings

__all__ = ["train_on_spark", "train_rank", "task_slots", "rank_errors", "ERRORS_DIR"]

# Folder of out_dir where a failing rank leaves its error for the driver.
ERRORS_DIR = "errors"

_LOCAL_THREADS = re.compile(r"local(?:\[(\*|\d+)(?:,\d+)?\])?")


def train_rank(config_dict: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """One rank of a data-parallel run, inside a Spark task's ``torchrun`` process.

    Reads the rendezvous from the environment ``torchrun`` sets, trains, and
    returns the history as dicts (the launcher keeps rank 0's).  Plain
    arguments only: the function is pickled by reference, so it travels to
    the executors as its module's name and nothing of the driver with it.

    An error is also written to ``out_dir/errors/rank-R.txt`` before it is
    raised: what reaches the driver through Spark is only TorchDistributor's
    "failed during training", the rank's traceback goes to the logs.
    """
    import torch
    import torch.distributed as dist

    config = TrainConfig.from_dict(config_dict)
    rank = os.environ.get("RANK", "?")
    try:
        if config.device.startswith("cuda"):
            # TorchDistributor restricts CUDA_VISIBLE_DEVICES to the task's GPU(s)
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
        try:
            history = train(config, resume=resume)
        finally:
            dist.destroy_process_group()
    except Exception as exc:
        errors = Path(config.out_dir) / ERRORS_DIR
        errors.mkdir(parents=True, exist_ok=True)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        (errors / f"rank-{rank}.txt").write_text(f"rank {rank}: {type(exc).__name__}: {first_line}\n",
                                                  encoding="utf-8")
        raise
    return [asdict(record) for record in history]


def rank_errors(out_dir: Path) -> list[str]:
    """The errors ranks wrote to ``out_dir/errors``, the earliest first (usually the cause of the others)."""
    files = sorted((Path(out_dir) / ERRORS_DIR).glob("rank-*.txt"), key=lambda p: p.stat().st_mtime_ns)
    return [p.read_text(encoding="utf-8").strip() for p in files]


def task_slots(spark: SparkSession) -> int | None:
    """Barrier tasks a local-mode master can run at once (``local[N]`` / ``spark.task.cpus``); None on a cluster.

    On a cluster the slots are the registered executors' cores, which Spark
    itself checks when the barrier stage is submitted.
    """
    sc = spark.sparkContext
    match = _LOCAL_THREADS.fullmatch(sc.master)
    if match is None:
        return None
    threads = match.group(1)
    cores = 1 if threads is None else (os.cpu_count() or 1) if threads == "*" else int(threads)
    return cores // _task_cpus(spark)


def _task_cpus(spark: SparkSession) -> int:
    return int(spark.sparkContext.getConf().get("spark.task.cpus", "1"))


class _HistoryWatcher:
    """Calls ``on_epoch`` for each record rank 0 adds to ``history.json`` while Spark runs.

    Only a file written after the watcher started counts (a fresh run may
    find an earlier run's file in ``out_dir``), and only epochs after
    ``after_epoch`` (those of a resumed run are known already).
    """

    def __init__(self, path: Path, after_epoch: int, on_epoch: Callable[[EpochRecord], None],
                 interval_s: float) -> None:
        self.path = path
        self.reported = after_epoch
        self.on_epoch = on_epoch
        self.interval_s = interval_s
        self.initial = self._stat()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="denoise-train-progress", daemon=True)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def poll(self) -> None:
        if self._stat() in (None, self.initial):
            return
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # replaced between stat and read: the next poll sees the new file
            return
        for data in records:
            if data["epoch"] > self.reported:
                self.reported = data["epoch"]
                self.on_epoch(EpochRecord(**data))

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> "_HistoryWatcher":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def train_on_spark(
    config: TrainConfig,
    processes: int,
    *,
    resume: bool = False,
    master: str | None = None,
    spark_settings: SparkSettings | None = None,
    on_data: Callable[[str, int, int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    poll_interval_s: float = 1.0,
) -> list[EpochRecord]:
    """Train like :func:`denoise.train.train`, on ``processes`` Spark tasks with DDP; returns the history.

    Each step averages the gradients of ``processes * config.batch_size``
    patches (``batch_size`` per rank).  ``master=None`` is the settings'
    ``spark.master`` (or spark-submit's); a session already running in this
    process is used if it is for that master.  Callbacks:
    ``on_data(set_name, done, total)`` while the driver simulates the pairs,
    ``on_start(epochs_done, epochs)`` when the Spark job is submitted, and
    ``on_epoch(record)`` for each epoch rank 0 finishes (polled from
    ``history.json``).

    Raises ``ValueError`` for a bad configuration, master or process count,
    ``FileNotFoundError`` when there is nothing to resume,
    :class:`~pacs.errors.SparkUnavailable` when Spark cannot start and
    :class:`~pacs.errors.JobFailed` when a task fails.
    """
    from pacs.errors import JobFailed
    from pacs.settings import SparkSettings
    from pacs.spark import check_master, launched_by_spark_submit, spark_session, task_error_message

    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes: expected a positive number of Spark tasks, got {processes!r}")
    config.check()
    # the executors' working folders are not the driver's: relative folders would name other places
    config = dataclasses.replace(config, out_dir=Path(config.out_dir).absolute(),
                                 cache_dir=Path(config.cache_dir).absolute())
    spark_settings = spark_settings or SparkSettings()
    if master is None and not launched_by_spark_submit():
        master = spark_settings.master
    if master is not None:
        master = check_master(master)  # before minutes of simulation, not after
    done_epochs = 0
    if resume:  # the same checks every rank will make, here where the message reaches the user
        effective, state = load_resume_state(config)
        done_epochs = int(state["epoch"])
        config = dataclasses.replace(effective, device=config.device)
        del state

    def progress_of(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: on_data(name, done, total)) if on_data else None

    train_pairs = build_pair_set(config.cache_dir, config.train_seed, config.train_slices, config.simulation,
                                 workers=config.simulation_workers, progress=progress_of("training slices"))
    build_pair_set(config.cache_dir, config.val_seed, config.val_slices, config.simulation,
                   workers=config.simulation_workers, progress=progress_of("validation slices"))
    PatchSampler(train_pairs, config.patch_px, config.task_weights)  # patch size and tasks, checked here
    del train_pairs
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / ERRORS_DIR).glob("rank-*.txt"):
        stale.unlink()

    # A barrier stage waits for enough slots, retrying every 15 s for 10 minutes by default: on a
    # cluster whose executors are still registering that helps, beyond a minute it only hides a mistake.
    barrier_checks = {"spark.scheduler.barrier.maxConcurrentTasksCheck.interval": "5s",
                      "spark.scheduler.barrier.maxConcurrentTasksCheck.maxFailures": "12"}
    with spark_session(master, "pacs denoise train", settings=spark_settings, config=barrier_checks) as spark:
        from pyspark.ml.torch.distributor import TorchDistributor

        where = f"training on Spark ({spark.sparkContext.master}, {processes} processes)"
        slots = task_slots(spark)
        if slots is not None and processes > slots:
            raise ValueError(f"processes: expected at most {slots} (the task slots of {spark.sparkContext.master} "
                             f"with spark.task.cpus={_task_cpus(spark)}), got {processes}")
        # torch in each task uses the cores Spark gave the task, no more (the others are other tasks')
        task_config = dataclasses.replace(config, threads=_task_cpus(spark))
        if on_start:
            on_start(done_epochs, config.epochs)
        watcher = _HistoryWatcher(out / "history.json", done_epochs, on_epoch or (lambda record: None),
                                  poll_interval_s)
        try:
            distributor = TorchDistributor(num_processes=processes, local_mode=False,
                                           use_gpu=config.device.startswith("cuda"))
            # its INFO lines ("Started distributed training ...") say what on_start/on_epoch report already
            distributor.logger.setLevel(logging.WARNING)
            with watcher:
                history = distributor.run(train_rank, task_config.to_dict(), resume)
        except Exception as exc:  # a task's error comes back wrapped in Py4J/pyspark errors of many types
            if "BarrierJobSlotsNumberCheckFailed" in str(exc):
                raise JobFailed(f"{where}: expected {processes} free task slots (executor cores / "
                                f"spark.task.cpus), got fewer for a minute; start more workers or ask for "
                                f"fewer processes") from exc
            reasons = rank_errors(out) or [task_error_message(exc)]
            raise JobFailed(f"{where} failed: {'; '.join(reasons)}") from exc
        watcher.poll()  # epochs finished since the last poll
    return [EpochRecord(**record) for record in history]
