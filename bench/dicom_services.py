"""DICOM network services, the archive (``pacs serve``) vs Orthanc, with the same dcmtk clients.

    .venv/bin/python bench/dicom_services.py [--quick] [--keep] [--rounds N] [--cluster [--replication 3,1]]

Both servers run as child processes on fresh data dirs, bound to loopback
(Orthanc 1.10 cannot choose its listen address; it gets "RemoteAccessAllowed":
false), and every dcmtk client, storescp and both servers run with
``TCP_NODELAY=1`` in the environment (see docs/conformance.md: without it
every exchange waits for delayed ACKs).  Measured, in the same run:

1. C-STORE: 500 CT instances of 512x512x16-bit over one association (one
   ``storescu`` call) and over 4 parallel associations (4 ``storescu``
   processes, a quarter each, a different series); wall time of the storescu
   run(s) -> instances/s and MB/s (file bytes).
2. C-STORE: 5,000 instances of 64x64 over one association (``--quick``: 1,000).
3. C-FIND at STUDY level after 2,000 studies x 10 instances of 64x64
   (``--quick``: 200) are in the archive: median and p95 of 20 ``findscu``
   runs, each one process + one association (setup included), for a
   1-match query and for ``PatientName=PAT*`` (every study matches); an
   ``echoscu`` run gives the process + association floor.  The same two
   queries on an open association: ``findscu --repeat 21`` against
   ``--repeat 1`` (medians of 5 runs), the difference over 20.  pacs is filled
   through its ingest service before ``pacs serve`` starts; Orthanc through
   4 parallel storescu associations (its fill rate is printed too).
4. C-MOVE (``movescu`` to a ``storescp`` started here) and C-GET (``getscu``
   into a temp dir) of the first 500-instance CT series: MB/s.  Besides, a
   C-GET of the second series right after its four associations stored it
   (on HDFS its packs are still being written, which a retrieve of the first
   series, one pack full and sealed, does not show).  And both retrieves of
   the first series again with the peer dropping what it receives
   (``storescp --ignore``, ``getscu --ignore``; the instances counted in
   ``storescp``'s log and in ``getscu``'s final response): a peer writing files spends from 0.3 to over 2 ms of
   kernel time per 0.5 MB image on a VM that charges new page cache by the
   minute, which bounds both servers' figures; without it the rate is the
   server's own.

With ``--cluster``, pacs is measured a second time on HDFS + Postgres from
``deploy/`` (``--replication`` adds a server per replication factor of its
packs).

Besides the rates, each row's server CPU per instance: user + system time of
the server's processes over the row (``pacs serve`` and its workers,
Orthanc), and on the cluster that of its DataNodes, NameNode and Postgres.
On a machine whose memory and CPUs swing, a rate carries the swing of
every process on it (the peer's included); a server's CPU per instance is
its own cost.

A server's place in the run moves its figures (on some virtual machines,
memory the guest has not touched for a while costs many times more to fill;
docs/benchmarks.md), so every server is measured in several rounds, the
order turned by one each round: by default as many rounds as servers, each
leading one round.  Every cell is the median over the rounds, with each
round's figure beside it.  ``--rounds 1`` measures once;
``--peer-first`` puts Orthanc first in round 1 (by default pacs leads).
For each server of each round the machine's busy, iowait and steal shares
are printed: a round that is slow for every server shows there when the host
took the CPUs.
Each server's stored data is deleted when its measurements are done,
and the next server starts once the machine is quiet (under 10 % busy for a
second, at most 90 s): DataNodes deleting blocks or a disk writing back are
not charged to it.

Orthanc (Debian package ``orthanc``) is installed with apt-get when
``Orthanc`` is not on PATH.  Every process started here is stopped by its PID
(its process group) in a finally block.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pacs.synthetic import SeriesSpec, make_series, make_study_set, uid  # noqa: E402

HOST = "127.0.0.1"
from pacs import devstack  # noqa: E402

# The cluster variant gets its settings explicitly (PacsCluster.env / .settings); none of the shell's reach a server.
devstack.forget_shell_settings()
ENV = {**os.environ, "TCP_NODELAY": "1"}
PACS_BIN = str(Path(sys.executable).with_name("pacs"))
FIND_RUNS = 20
# Fetches of the stored series per server and round for the C-MOVE and C-GET rows (the median is kept):
# one 0.4-second fetch moves with the peer's own cost per image more than with either server.
RETRIEVES = 3
OPEN_REPEATS, OPEN_RUNS = 20, 5  # C-FIND on an open association (findscu --repeat)
SCP_AET = "BENCHSCP"
NULL_AET = "BENCHNULL"  # a storescp that receives and answers, writing nothing (--ignore)


# --------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {HOST}:{port} after {timeout}s")


class Procs:
    """Child processes started here; each in its own session, stopped by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, **kw) -> subprocess.Popen:
        out = open(log, "wb")
        kw.setdefault("env", ENV)
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group led by this PID (workers included)
            except ProcessLookupError:
                pass
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        else:  # leader gone: make sure nothing of its group is left behind
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)


def cpu_fields() -> list[int]:
    """The machine's jiffies from /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal, ..."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine; waiting for I/O counts as busy."""
    fields = cpu_fields()
    idle = fields[3]  # fields[4], iowait, stays busy: a disk still writing is not a quiet machine
    return sum(fields) - idle, sum(fields)


def machine_share(before: list[int], after: list[int]) -> str:
    """What the whole machine did between two :func:`cpu_fields`, in % of all its CPUs.

    Steal is time the host ran something else while this machine wanted a
    CPU: a server measured while it is high was measured on a slower machine.
    """
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    steal = d[7] if len(d) > 7 else 0
    return (f"busy {100 * (total - d[3]) / total:.0f} %, iowait {100 * d[4] / total:.0f} %, "
            f"steal {100 * steal / total:.1f} %")


def wait_quiet(busy_below: float = 0.1, limit_s: float = 90.0) -> float:
    """Wait until the machine is quiet (under ``busy_below`` of its CPUs for a second); the seconds waited.

    Before each server: what the previous one left running (DataNodes
    deleting its blocks, the kernel writing back its files) is not charged
    to the next.
    """
    started = time.monotonic()
    busy, total = cpu_ticks()
    while time.monotonic() - started < limit_s:
        time.sleep(1.0)
        busy2, total2 = cpu_ticks()
        if total2 > total and (busy2 - busy) / (total2 - total) < busy_below:
            break
        busy, total = busy2, total2
    return time.monotonic() - started


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pgid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by the live processes of a process group (a server and its
    workers), and by the dev stack's (the HDFS daemons and the Postgres server): one pass over /proc."""
    group = stack = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
            if int(fields[2]) == pgid:
                group += seconds
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if ("java" in cmd and "org.apache.hadoop.hdfs" in cmd) or cmd.startswith("postgres"):
            stack += seconds
    return group, stack


@contextmanager
def cpu_per_instance(server, r: dict, key: str, instances: int):  # noqa: ANN001
    """Record in ``r[key]`` the server's CPU ms per instance over the block (and, on the cluster, its stack's)."""
    before = cpu_s(server.proc.pid)
    yield
    after = cpu_s(server.proc.pid)
    r.setdefault(key, []).append(1e3 * (after[0] - before[0]) / instances)
    if isinstance(server, PacsCluster):
        r.setdefault(f"{key}_stack", []).append(1e3 * (after[1] - before[1]) / instances)


def run_clients(cmds: list[list[str]], what: str, outputs: list[str] | None = None) -> float:
    """Run the commands in parallel; wall seconds from the first start to the last exit (their output
    appended to ``outputs`` if given)."""
    started = time.perf_counter()
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in cmds]
    outs = [p.communicate()[0].decode(errors="replace") for p in procs]
    elapsed = time.perf_counter() - started
    for p, out in zip(procs, outs):
        bad = [ln for ln in out.splitlines() if ln.startswith(("E:", "F:"))]
        if p.returncode != 0 or bad:
            raise RuntimeError(f"{what}: {p.args[0]} rc={p.returncode}\n" + "\n".join((bad or out.splitlines())[:15]))
    if outputs is not None:
        outputs += outs
    return elapsed


def write_files(folder: Path, blobs) -> tuple[int, int]:
    folder.mkdir(parents=True, exist_ok=True)
    n = size = 0
    for i, data in enumerate(blobs):
        (folder / f"{i:06d}.dcm").write_bytes(data)
        n += 1
        size += len(data)
    return n, size


def dir_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def storescu(aet: str, port: int, folder: Path) -> list[str]:
    # +sd: scan the folder; one association for all of its files
    return ["storescu", "-aet", "STORESCU", "-aec", aet, "+sd", HOST, str(port), str(folder)]


def series_keys(study_uid: str, series_uid: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
            "-k", f"SeriesInstanceUID={series_uid}"]


def getscu(aet: str, port: int, keys: list[str], out: Path | None) -> list[str]:
    """A C-GET into ``out``; with none, every object received and answered, and dropped (``--ignore``:
    the peer's cost of writing files left out), the final response's counts logged (``-v``)."""
    where = ["-od", str(out)] if out is not None else ["--ignore", "-v"]
    return ["getscu", "-aet", "GETSCU", "-aec", aet, "-S", *keys, *where, HOST, str(port)]


def completed_suboperations(output: str, what: str) -> int:
    """The Number of Completed Suboperations of a getscu run's final response (logged with ``-v``)."""
    for line in output.splitlines():
        if "Number of Completed Suboperations" in line:
            return int(line.rsplit(":", 1)[1])
    raise RuntimeError(f"{what}: no final response counts in the client's output:\n{output[-1500:]}")


def series_count(aet: str, port: int, study_uid: str, series_uid: str, tmp: Path) -> int:
    """NumberOfSeriesRelatedInstances of a series, by findscu (a check, not timed)."""
    out = tmp / f"chk-{time.monotonic_ns()}"
    out.mkdir()
    subprocess.run(["findscu", "-aec", aet, "-S", "-k", "QueryRetrieveLevel=SERIES",
                    "-k", f"StudyInstanceUID={study_uid}", "-k", f"SeriesInstanceUID={series_uid}",
                    "-k", "NumberOfSeriesRelatedInstances", "-X", "-od", str(out), HOST, str(port)],
                   env=ENV, check=True, capture_output=True)
    import pydicom

    rsps = sorted(out.glob("*.dcm"))
    return int(pydicom.dcmread(rsps[0]).NumberOfSeriesRelatedInstances) if rsps else 0


def find_cmd(aet: str, port: int, keys: list[str], out: Path | None = None, repeat: int = 1) -> list[str]:
    cmd = ["findscu", "-aec", aet, "-S", "-k", "QueryRetrieveLevel=STUDY"]
    for k in keys:
        cmd += ["-k", k]
    if out is not None:
        cmd += ["-X", "-od", str(out)]
    if repeat > 1:
        cmd += ["--repeat", str(repeat)]  # the same query again and again on one association
    return cmd + [HOST, str(port)]


def open_association_ms(aet: str, port: int, keys: list[str]) -> float:
    """Milliseconds per C-FIND on an open association: (one run of 1 + OPEN_REPEATS queries - one of 1) / OPEN_REPEATS.

    Medians of ``OPEN_RUNS`` runs each, so process start and association set-up cancel out.
    """
    many = timed_runs(find_cmd(aet, port, keys, repeat=1 + OPEN_REPEATS), OPEN_RUNS)[0]
    one = timed_runs(find_cmd(aet, port, keys), OPEN_RUNS)[0]
    return (many - one) / OPEN_REPEATS


def timed_runs(cmd: list[str], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - started)
    samples.sort()
    p95 = samples[min(len(samples) - 1, -(-95 * len(samples) // 100) - 1)]  # nearest rank
    return statistics.median(samples) * 1e3, p95 * 1e3


# --------------------------------------------------------------------------- servers

class Server:
    """What every server here has: a process started and stopped by PID, and data folders under the temp folder."""

    name: str

    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.procs, self.tmp = procs, tmp
        self.proc: subprocess.Popen | None = None
        self.data_dirs: list[Path] = []

    @property
    def slug(self) -> str:
        """The server's name as a file name ("pacs HDFS+PG r1" -> "pacs-HDFS-PG-r1")."""
        return self.name.replace(" ", "-").replace("+", "-")

    def new_data_dir(self, tag: str) -> Path:
        d = self.tmp / f"{self.slug}-{tag}"
        d.mkdir()
        self.data_dir = d
        self.data_dirs.append(d)
        return d

    def discard(self) -> None:
        """Delete what this server stored, once its measurements are done (see ``--keep``)."""
        for d in self.data_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.data_dirs.clear()

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


class Pacs(Server):
    name = "pacs"
    aet = "PACS"

    def __init__(self, procs: Procs, tmp: Path) -> None:
        super().__init__(procs, tmp)
        help_text = subprocess.run([PACS_BIN, "serve", "--help"], capture_output=True, text=True).stdout
        self.has_workers_option = "--workers" in help_text
        self.workers = (os.cpu_count() or 1) if self.has_workers_option else 1

    @staticmethod
    def version() -> str:
        try:
            v = metadata.version("pacs")
        except metadata.PackageNotFoundError:
            v = "?"
        return f"pacs {v} (pynetdicom {metadata.version('pynetdicom')}, pydicom {metadata.version('pydicom')}, " \
               f"Python {platform.python_version()})"

    @property
    def env(self) -> dict[str, str]:
        return ENV

    def settings(self):  # noqa: ANN201
        from pacs.settings import Settings

        return Settings(data_dir=self.data_dir)

    def add_move_destination(self, port: int, aet: str = SCP_AET) -> None:
        subprocess.run([PACS_BIN, "ae", "add", aet, HOST, str(port), "--data-dir", str(self.data_dir)],
                       check=True, capture_output=True, env=self.env)

    def prefill(self, folder: Path) -> tuple[int, float]:
        from pacs.services import build_services

        services = build_services(self.settings())
        files = sorted(folder.rglob("*.dcm"))
        started = time.perf_counter()
        try:
            for f in files:
                services.ingest.store(f.read_bytes(), source_ae="BENCH")
            services.compactor.wait()
        finally:
            services.close()
        return len(files), time.perf_counter() - started

    def start(self) -> None:
        self.port = free_port()
        args = [PACS_BIN, "serve", "--data-dir", str(self.data_dir), "--dicom-port", str(self.port),
                "--aet", self.aet, "--host", HOST]
        if self.has_workers_option:
            args += ["--workers", str(self.workers)]
        self.proc = self.procs.start(args, self.tmp / f"pacs-serve-{self.data_dir.name}.log", env=self.env)
        wait_port(self.port, self.proc)
        subprocess.run(["echoscu", "-aec", self.aet, HOST, str(self.port)], env=ENV, check=True, capture_output=True)


class PacsCluster(Pacs):
    """``pacs serve`` on HDFS (3 DataNodes) + Postgres from ``deploy/``, packs at ``replication``.

    Needs the dev stack up: ``bash deploy/hdfs.sh up && bash deploy/postgres.sh up``
    (the URLs come from their ``env`` commands).  Each data dir gets a fresh
    HDFS root and an emptied database; the allow-list is off, as for Orthanc.
    Replication 3 is the cluster default and is named plainly; any other
    factor is named in the server's column ("pacs HDFS+PG r1").
    """

    def __init__(self, procs: Procs, tmp: Path, replication: int = 3) -> None:
        self.replication = replication
        self.name = "pacs HDFS+PG" if replication == 3 else f"pacs HDFS+PG r{replication}"
        super().__init__(procs, tmp)
        for url, what in ((devstack.HDFS_URL, "HDFS"), (devstack.PG_URL, "Postgres")):
            if not devstack.reachable(url):
                raise RuntimeError(f"{what} is not reachable at {url}: start it with deploy/ (see --cluster help)")
        self.hdfs_url, self.pg_url = devstack.HDFS_URL, devstack.PG_URL
        self.hdfs_roots: list[str] = []

    def new_data_dir(self, tag: str) -> Path:
        d = super().new_data_dir(tag)
        devstack.empty_database(self.pg_url)
        self.hdfs_root = f"/bench/{d.name}-{os.getpid()}"
        self.hdfs_roots.append(self.hdfs_root)
        return d

    def discard(self) -> None:
        """Delete what this server stored, on HDFS too (gigabytes, times the replication)."""
        super().discard()
        for root in self.hdfs_roots:
            devstack.remove_hdfs_tree(root)
        self.hdfs_roots.clear()
        self.wait_deletions_sent()

    @staticmethod
    def wait_deletions_sent(limit_s: float = 60.0) -> None:
        """Wait until the NameNode has handed every deleted block to its DataNodes.

        It does so a batch per heartbeat; the DataNodes delete the files on
        their own threads, and ``wait_quiet`` before the next server waits
        for that.  The next server is not measured while three DataNodes
        delete gigabytes of block files beside it.
        """
        deadline = time.monotonic() + limit_s
        while (pending := devstack.hdfs_pending_deletions()) > 0:
            if time.monotonic() > deadline:
                print(f"the NameNode still has {pending} blocks to delete after {limit_s:.0f}s; going on", flush=True)
                return
            time.sleep(0.5)

    @property
    def env(self) -> dict[str, str]:
        return {**ENV, "PACS_STORAGE__BACKEND": "hdfs", "PACS_HDFS_URL": self.hdfs_url,
                "PACS_STORAGE__HDFS_ROOT": self.hdfs_root, "PACS_REPLICATION": str(self.replication),
                "PACS_INDEX_URL": self.pg_url, "PACS_DICOM__REQUIRE_KNOWN_AE": "false"}

    def settings(self):  # noqa: ANN201
        from pacs.settings import Settings

        return Settings(data_dir=self.data_dir, storage={"backend": "hdfs", "hdfs_url": self.hdfs_url,
                                                         "hdfs_root": self.hdfs_root,
                                                         "replication": self.replication},
                        index={"url": self.pg_url}, dicom={"require_known_ae": False})


class Orthanc(Server):
    name = "Orthanc"
    aet = "ORTHANC"

    def __init__(self, procs: Procs, tmp: Path) -> None:
        super().__init__(procs, tmp)
        self.move_ports: dict[str, int] = {}
        ensure_orthanc()
        shipped = Path("/etc/orthanc/orthanc.json")
        self.known_keys = shipped.read_text() if shipped.exists() else ""

    @staticmethod
    def version() -> str:
        out = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip() if out else "Orthanc ?"

    def add_move_destination(self, port: int, aet: str = SCP_AET) -> None:
        self.move_ports[aet] = port

    def start(self) -> None:
        self.port, self.http_port = free_port(), free_port()
        config = {
            "Name": "bench",
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # 1.10 has no listen-address option: loopback clients only
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self.data_dir / "storage"),
            "IndexDirectory": str(self.data_dir / "index"),
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {aet: [aet, HOST, port] for aet, port in self.move_ports.items()},
            "Plugins": [],
        }
        if '"TcpNoDelay"' in self.known_keys:  # HTTP side; the DICOM side gets TCP_NODELAY=1 in its env
            config["TcpNoDelay"] = True
        cfg = self.data_dir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        self.proc = self.procs.start(["Orthanc", str(cfg)], self.tmp / f"orthanc-{self.data_dir.name}.log")
        wait_port(self.port, self.proc)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{HOST}:{self.http_port}/system", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        subprocess.run(["echoscu", "-aec", self.aet, HOST, str(self.port)], env=ENV, check=True, capture_output=True)


def ensure_orthanc() -> None:
    if shutil.which("Orthanc"):
        return
    print("Orthanc not on PATH: apt-get install orthanc ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "orthanc"], env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "orthanc"], env=env, check=True)
    # the package's init script may have started the system service: stop it, we run our own
    subprocess.run(["service", "orthanc", "stop"], env=env, capture_output=True)


# --------------------------------------------------------------------------- the benchmark

@contextmanager
def storescp(procs: Procs, out: Path, discard: bool = False):
    """A storescp writing what it receives into ``out``; with ``discard``, writing nothing (``--ignore``,
    AE title NULL_AET), each request it answers logged (``-v``) in ``out``'s log (see :func:`stores_logged`)."""
    port = free_port()
    if discard:
        args = ["storescp", "--ignore", "-v", "-aet", NULL_AET, str(port)]
    else:
        out.mkdir(parents=True, exist_ok=True)
        args = ["storescp", "-aet", SCP_AET, "-od", str(out), str(port)]
    proc = procs.start(args, storescp_log(out))
    try:
        wait_port(port, proc)
        yield port
    finally:
        procs.stop(proc)


def storescp_log(out: Path) -> Path:
    return out.parent / f"{out.name}.log"


def stores_logged(log: Path) -> int:
    """How many C-STORE requests a ``storescp -v`` has logged so far."""
    with open(log, errors="replace") as f:
        return sum(1 for line in f if "Received Store Request" in line)


def bench_server(server, data: dict, r: dict, procs: Procs, tmp: Path, tag: str) -> None:
    """Measure one server into ``r``; ``tag`` tells its data folders apart from other rounds'."""
    ct = data["ct"]
    prefix = f"{server.slug}{tag}"  # of the folders the clients write into
    # ---- phase 1: fresh data dir, store / move / get
    server.new_data_dir(f"store{tag}")
    moved = tmp / f"{prefix}-moved"
    null = tmp / f"{prefix}-null"
    with storescp(procs, moved) as scp_port, storescp(procs, null, discard=True) as null_port:
        server.add_move_destination(scp_port)
        server.add_move_destination(null_port, NULL_AET)
        server.start()
        try:
            with cpu_per_instance(server, r, "store1_cpu", ct["n"]):
                secs = run_clients([storescu(server.aet, server.port, ct["dir1"])], "store 1 assoc")
            r["store1"] = secs
            got = series_count(server.aet, server.port, ct["study"], ct["series1"], tmp)
            if got != ct["n"]:
                raise RuntimeError(f"{server.name}: {got} of {ct['n']} CT instances stored (1 assoc)")
            with cpu_per_instance(server, r, "store4_cpu", ct["n"]):
                secs = run_clients([storescu(server.aet, server.port, q) for q in ct["quarters"]], "store 4 assoc")
            r["store4"] = secs
            got = series_count(server.aet, server.port, ct["study"], ct["series4"], tmp)
            if got != ct["n"]:
                raise RuntimeError(f"{server.name}: {got} of {ct['n']} CT instances stored (4 assoc)")
            # A viewer pulling a study the moment it arrived: on HDFS, from packs still being written.
            fresh_dir = tmp / f"{prefix}-fresh"
            fresh_dir.mkdir()
            r["get_fresh"] = run_clients([getscu(server.aet, server.port, series_keys(ct["study"], ct["series4"]),
                                                 fresh_dir)], "C-GET just stored")
            r["get_fresh_n"], r["get_fresh_bytes"] = received(fresh_dir, ct["n"], "C-GET just stored")
            small = data["small"]
            with cpu_per_instance(server, r, "small_cpu", small["n"]):
                r["small"] = run_clients([storescu(server.aet, server.port, small["dir"])], "store small")
            got = series_count(server.aet, server.port, small["study"], small["series"], tmp)
            if got != small["n"]:
                raise RuntimeError(f"{server.name}: {got} of {small['n']} small instances stored")

            keys = series_keys(ct["study"], ct["series1"])
            moves, gets = [], []
            for _ in range(RETRIEVES):
                with cpu_per_instance(server, r, "move_cpu", ct["n"]):
                    moves.append(run_clients([["movescu", "-aet", "MOVESCU", "-aec", server.aet, "-aem", SCP_AET,
                                               "-S", *keys, HOST, str(server.port)]], "C-MOVE"))
                # storescp (still up) writes its files flat into -od: counted, then deleted
                r["move_n"], r["move_bytes"] = received(moved, ct["n"], "C-MOVE", keep_dir=True)
            for _ in range(RETRIEVES):
                got_dir = tmp / f"{prefix}-got"
                got_dir.mkdir()
                with cpu_per_instance(server, r, "get_cpu", ct["n"]):
                    gets.append(run_clients([getscu(server.aet, server.port, keys, got_dir)], "C-GET"))
                r["get_n"], r["get_bytes"] = received(got_dir, ct["n"], "C-GET")
            # The same, the peer dropping every object it receives: the servers' figures without the
            # peer's cost of writing 500 new files (on a VM, from 0.3 to over 2 ms per image).
            null_moves, null_gets = [], []
            for _ in range(RETRIEVES):
                before = stores_logged(storescp_log(null))
                with cpu_per_instance(server, r, "move_null_cpu", ct["n"]):
                    null_moves.append(run_clients([["movescu", "-aet", "MOVESCU", "-aec", server.aet,
                                                    "-aem", NULL_AET, "-S", *keys, HOST, str(server.port)]],
                                                  "C-MOVE to storescp --ignore"))
                r["move_null_n"] = expect(stores_logged(storescp_log(null)) - before, ct["n"],
                                          "C-MOVE to storescp --ignore")
            for _ in range(RETRIEVES):
                out: list[str] = []
                with cpu_per_instance(server, r, "get_null_cpu", ct["n"]):
                    null_gets.append(run_clients([getscu(server.aet, server.port, keys, None)],
                                                 "C-GET --ignore", out))
                r["get_null_n"] = expect(completed_suboperations(out[0], "C-GET --ignore"), ct["n"], "C-GET --ignore")
            r["move"], r["get"] = statistics.median(moves), statistics.median(gets)
            r["move_null"], r["get_null"] = statistics.median(null_moves), statistics.median(null_gets)
        finally:
            server.stop()
    shutil.rmtree(moved, ignore_errors=True)

    # ---- phase 2: fresh data dir with the study set, C-FIND
    server.new_data_dir(f"find{tag}")
    studies = data["studies"]
    if isinstance(server, Pacs):
        n, secs = server.prefill(studies["dir"])
        r["fill"] = (n, secs)
        server.start()
    else:
        server.start()
        secs = run_clients([storescu(server.aet, server.port, q) for q in studies["quarters"]], "fill")
        r["fill"] = (studies["n"], secs)
    try:
        one = [f"PatientName={studies['one_name']}", f"AccessionNumber={studies['one_acc']}", "StudyInstanceUID"]
        broad = ["PatientName=PAT*", "StudyInstanceUID"]
        for label, keys in (("find1", one), ("findall", broad)):
            out = tmp / f"{prefix}-{label}"
            out.mkdir()
            subprocess.run(find_cmd(server.aet, server.port, keys, out), env=ENV, check=True, capture_output=True)
            r[f"{label}_matches"] = len(list(out.glob("*.dcm")))
            shutil.rmtree(out)
            r[label] = timed_runs(find_cmd(server.aet, server.port, keys), FIND_RUNS)
            r[f"{label}_open"] = open_association_ms(server.aet, server.port, keys)
        r["echo"] = timed_runs(["echoscu", "-aec", server.aet, HOST, str(server.port)], FIND_RUNS)
    finally:
        server.stop()


def expect(n: int, expected: int, what: str) -> int:
    """``n`` instances received; any other count than ``expected`` is an error."""
    if n != expected:
        raise RuntimeError(f"{what}: {n} of {expected} instances received")
    return n


def received(folder: Path, expected: int, what: str, keep_dir: bool = False) -> tuple[int, int]:
    """Count (files, bytes) a retrieve wrote into ``folder`` and delete them; fewer than ``expected`` is an error."""
    n, size = dir_bytes(folder)
    if keep_dir:
        for f in folder.iterdir():
            if f.is_file():
                f.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return expect(n, expected, what), size


def make_data(tmp: Path, quick: bool) -> dict:
    started = time.perf_counter()
    data: dict = {}
    ct1 = SeriesSpec(patient_id="BENCHCT", patient_name="BENCH^CT", study_key="bench-ct",
                     series_key="ct-1", count=500)
    ct4 = SeriesSpec(patient_id="BENCHCT", patient_name="BENCH^CT", study_key="bench-ct",
                     series_key="ct-4", series_number=2, count=500)
    n, size = write_files(tmp / "ct1", make_series(ct1))
    quarters = []
    blobs = list(make_series(ct4))
    for q in range(4):
        write_files(tmp / f"ct4/q{q}", blobs[q::4])
        quarters.append(tmp / f"ct4/q{q}")
    data["ct"] = dict(dir1=tmp / "ct1", quarters=quarters, n=n, bytes=size, bytes4=sum(len(b) for b in blobs),
                      study=uid("bench-ct"), series1=uid("bench-ct", "ct-1"), series4=uid("bench-ct", "ct-4"))
    del blobs
    n_small = 1000 if quick else 5000
    sm = SeriesSpec(patient_id="BENCHSM", patient_name="BENCH^SMALL", study_key="bench-small",
                    series_key="small-1", rows=64, columns=64, count=n_small)
    n, size = write_files(tmp / "small", make_series(sm))
    data["small"] = dict(dir=tmp / "small", n=n, bytes=size, study=uid("bench-small"),
                         series=uid("bench-small", "small-1"))
    n_studies = 200 if quick else 2000
    blobs = make_study_set(n_studies, 1, 10)
    quarters = [tmp / f"studies/q{q}" for q in range(4)]
    for q in quarters:
        q.mkdir(parents=True)
    n = size = 0
    for i, b in enumerate(blobs):  # a study's 10 instances go to one quarter
        (quarters[(i // 10) % 4] / f"{i:06d}.dcm").write_bytes(b)
        n += 1
        size += len(b)
    # one study: name PATIENT^{s%7:03d}, accession ACC{s:05d}
    s = n_studies // 2
    data["studies"] = dict(dir=tmp / "studies", quarters=quarters, n=n, bytes=size, count=n_studies,
                           one_name=f"PATIENT^{s % 7:03d}", one_acc=f"ACC{s:05d}")
    print(f"generated test data in {time.perf_counter() - started:.1f}s", flush=True)
    return data


def metrics(data: dict) -> list[tuple[str, object, str]]:
    """(label, figures of one server's results, format of the figures); the first figure is the headline."""
    ct, small, st = data["ct"], data["small"], data["studies"]
    mb_ct = ct["bytes"] / 1e6
    return [
        (f"C-STORE {ct['n']} CT 512x512 ({mb_ct:.0f} MB), 1 assoc: inst/s | MB/s",
         lambda r: (ct["n"] / r["store1"], mb_ct / r["store1"]), "{:.0f} | {:.1f}"),
        (f"C-STORE {ct['n']} CT 512x512, 4 parallel assoc: inst/s | MB/s",
         lambda r: (ct["n"] / r["store4"], ct["bytes4"] / 1e6 / r["store4"]), "{:.0f} | {:.1f}"),
        (f"C-STORE {small['n']} x 64x64, 1 assoc: inst/s", lambda r: (small["n"] / r["small"],), "{:.0f}"),
        (f"C-FIND STUDY, 1 match, {st['count']} studies: median | p95 ms", lambda r: r["find1"], "{:.1f} | {:.1f}"),
        (f"C-FIND STUDY PatientName=PAT* (all {st['count']} match): median | p95 ms",
         lambda r: r["findall"], "{:.1f} | {:.1f}"),
        (f"C-FIND STUDY on an open association (findscu --repeat): 1 match | all {st['count']} ms per query",
         lambda r: (r["find1_open"], r["findall_open"]), "{:.1f} | {:.1f}"),
        ("  matches returned (1-match | PAT*)", lambda r: (r["find1_matches"], r["findall_matches"]), "{:.0f} | {:.0f}"),
        ("C-ECHO (echoscu process + association floor): median | p95 ms", lambda r: r["echo"], "{:.1f} | {:.1f}"),
        (f"C-MOVE {ct['n']} CT to storescp, median of {RETRIEVES}: MB/s (instances received)",
         lambda r: (r["move_bytes"] / 1e6 / r["move"], r["move_n"]), "{:.1f} ({:.0f})"),
        (f"C-GET {ct['n']} CT by getscu, median of {RETRIEVES}: MB/s (instances received)",
         lambda r: (r["get_bytes"] / 1e6 / r["get"], r["get_n"]), "{:.1f} ({:.0f})"),
        (f"C-MOVE {ct['n']} CT to storescp --ignore (received, not written), median of {RETRIEVES}: MB/s "
         "(instances)", lambda r: (r["move_bytes"] / 1e6 / r["move_null"], r["move_null_n"]), "{:.1f} ({:.0f})"),
        (f"C-GET {ct['n']} CT by getscu --ignore (received, not written), median of {RETRIEVES}: MB/s (instances)",
         lambda r: (r["get_bytes"] / 1e6 / r["get_null"], r["get_null_n"]), "{:.1f} ({:.0f})"),
        ("C-GET of the 4-assoc series right after it was stored: MB/s (instances received)",
         lambda r: (r["get_fresh_bytes"] / 1e6 / r["get_fresh"], r["get_fresh_n"]), "{:.1f} ({:.0f})"),
        ("server CPU per instance, C-STORE 1 assoc | 4 assoc | 64x64: ms",
         lambda r: (statistics.median(r["store1_cpu"]), statistics.median(r["store4_cpu"]), statistics.median(r["small_cpu"])),
         "{:.2f} | {:.2f} | {:.2f}"),
        (f"server CPU per instance, C-MOVE | C-GET | both --ignore (median of {RETRIEVES}): ms",
         lambda r: (statistics.median(r["move_cpu"]), statistics.median(r["get_cpu"]),
                    statistics.median(r["move_null_cpu"]), statistics.median(r["get_null_cpu"])),
         "{:.2f} | {:.2f} | {:.2f} | {:.2f}"),
        ("  HDFS + Postgres CPU per instance, C-STORE 1 | 4 assoc | 64x64: ms",
         lambda r: (statistics.median(r["store1_cpu_stack"]), statistics.median(r["store4_cpu_stack"]), statistics.median(r["small_cpu_stack"])),
         "{:.2f} | {:.2f} | {:.2f}"),
        (f"  HDFS + Postgres CPU per instance, C-MOVE | C-GET (median of {RETRIEVES}): ms",
         lambda r: (statistics.median(r["move_cpu_stack"]), statistics.median(r["get_cpu_stack"])), "{:.2f} | {:.2f}"),
        (f"fill {st['n']} x 64x64 for C-FIND (pacs: ingest service in-process; Orthanc: storescu, 4 assoc): inst/s",
         lambda r: (r["fill"][0] / r["fill"][1],), "{:.0f}"),
    ]


def figures(rounds: list[dict], name: str, value) -> list[tuple | None]:  # noqa: ANN001
    """One server's figures for one metric, a tuple per round; None where that round has none (it failed)."""
    out: list[tuple | None] = []
    for results in rounds:
        try:
            out.append(tuple(value(results[name])))
        except (KeyError, ZeroDivisionError):
            out.append(None)
    return out


def table(data: dict, rounds: list[dict], names: list[str]) -> str:
    """Median over the rounds of every figure; with several rounds, each round's headline figure after it."""
    rows = []
    for label, value, fmt in metrics(data):
        cells = []
        for name in names:
            runs = figures(rounds, name, value)
            measured = [run for run in runs if run is not None]
            if not measured:
                cells.append("n/a")
                continue
            cell = fmt.format(*(statistics.median(col) for col in zip(*measured)))
            if len(rounds) > 1:
                head = fmt.split(" ")[0]
                cell += " [" + " ".join(head.format(run[0]) if run else "-" for run in runs) + "]"
            cells.append(cell)
        rows.append((label, *cells))
    widths = [max(len(row[i]) for row in rows + [("metric", *names)]) for i in range(len(names) + 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(("metric", *names), widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def rotated(servers: list, k: int) -> list:
    """Round ``k``'s order: the first order turned left by ``k``, so over len(servers) rounds each leads once."""
    k %= len(servers)
    return servers[k:] + servers[:k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 small instances, 200 studies")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (data, logs) and what was stored on HDFS")
    parser.add_argument("--only", choices=["pacs", "Orthanc"], help="run one server only")
    parser.add_argument("--cluster", action="store_true",
                        help="also pacs on HDFS + Postgres (start them first: bash deploy/hdfs.sh up; "
                             "bash deploy/postgres.sh up)")
    parser.add_argument("--peer-first", action="store_true",
                        help="measure Orthanc before pacs (by default after): a server's position in the run "
                             "decides what the servers before it left in the page cache")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="measure every server N times, the order turned by one each round (default: as many "
                             "rounds as servers, so each goes first once); cells are medians over the rounds")
    parser.add_argument("--replication", default="3", metavar="N[,N...]",
                        help="with --cluster: the HDFS replication of pacs's packs, one pacs HDFS+PG server per "
                             "factor (default 3, the cluster default). The dev stack's three DataNodes share this "
                             "one machine, so at 3 every byte is written and fsync'ed three times on one disk; "
                             "1 shows what one copy per machine costs")
    args = parser.parse_args()
    try:
        replications = [int(n) for n in args.replication.split(",")]
        if not replications or min(replications) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--replication {args.replication!r}: expected factors of 1 or more, like 3 or 3,1")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected 1 or more")

    tmp = Path(tempfile.mkdtemp(prefix="dicom-bench-"))
    procs = Procs()
    rounds: list[dict] = []
    machine: list[list[str]] = []  # per round, what the machine did while each server was measured
    errors: list[str] = []
    servers: list = []
    try:
        data = make_data(tmp, args.quick)
        if args.only in (None, "pacs"):
            servers.append(Pacs(procs, tmp))
            if args.cluster:
                servers += [PacsCluster(procs, tmp, replication=n) for n in replications]
        if args.only in (None, "Orthanc"):
            servers.append(Orthanc(procs, tmp))
        if args.peer_first:
            servers.sort(key=lambda server: not isinstance(server, Orthanc))
        n_rounds = args.rounds if args.rounds is not None else len(servers)
        versions = [s.version() for s in servers]
        versions.append(subprocess.run(["storescu", "--version"], capture_output=True, text=True)
                        .stdout.splitlines()[0].strip("$ ") + " (storescu/findscu/movescu/getscu/storescp)")
        for k in range(n_rounds):
            order = rotated(servers, k)
            rounds.append({})
            machine.append([])
            for server in order:
                waited = wait_quiet()
                if waited > 1.5:
                    print(f"waited {waited:.0f}s for the machine to go quiet before {server.name}", flush=True)
                started = time.perf_counter()
                r = rounds[k][server.name] = {}
                before = cpu_fields()
                try:
                    bench_server(server, data, r, procs, tmp, tag=f"-{k + 1}")
                except Exception as exc:  # noqa: BLE001 — report and go on with the other servers
                    errors.append(f"round {k + 1}, {server.name}: {type(exc).__name__}: {exc}")
                machine[k].append(f"{server.name}: {machine_share(before, cpu_fields())}")
                if not args.keep:
                    server.discard()  # its gigabytes of files, and the page cache they hold, before the next server
                print(f"round {k + 1}/{n_rounds}: {server.name} done in {time.perf_counter() - started:.0f}s",
                      flush=True)
        print()
        print(f"DICOM services benchmark{' (--quick)' if args.quick else ''}, "
              f"{platform.node()}, {os.cpu_count()} cores, loopback, TCP_NODELAY=1 everywhere")
        print("versions: " + "; ".join(versions))
        pacs = next((s for s in servers if isinstance(s, Pacs)), None)
        if any(isinstance(s, PacsCluster) for s in servers):
            factors = ", ".join(str(s.replication) for s in servers if isinstance(s, PacsCluster))
            print(f"pacs HDFS+PG: HDFS 3.5 (NameNode + 3 DataNodes on this machine; packs at replication {factors}) "
                  "and Postgres 15 from deploy/, same pacs serve options")
        if pacs is not None:
            print(f"pacs serve: embedded default (local files + SQLite), "
                  f"workers={pacs.workers}{'' if pacs.has_workers_option else ' (no --workers option yet)'}")
        print("Orthanc 1.10: default settings (SQLite index, StorageAccessOnFind=Always, "
              "MaximumPduLength 16384, DicomThreadsCount 4)")
        print("C-FIND / C-ECHO times are per findscu/echoscu process: process start + association "
              f"setup + query + release, {FIND_RUNS} runs")
        print("server CPU: user + system of the server's processes (pacs serve and its workers; Orthanc), per "
              "instance; on the cluster, HDFS + Postgres CPU is that of the DataNodes, the NameNode and Postgres")
        if n_rounds > 1:
            print(f"{n_rounds} rounds, each server's order turned by one per round; every cell is the median "
                  "over the rounds, [each round's first figure] after it")
        print("each round in its order, and what the machine did while each server was measured (% of its CPUs):")
        for k, shares in enumerate(machine):
            print(f"  round {k + 1}: " + "; ".join(shares))
        print()
        print(table(data, rounds, [s.name for s in servers]))
        for e in errors:
            print("ERROR " + e)
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            for server in servers:
                server.discard()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
