"""What new file data costs the kernel on this machine as the page cache grows.

    .venv/bin/python bench/page_cache.py [--gb 3] [--dir PATH]

Writes ``--gb`` GiB of files in 256 MiB steps (1 MiB ``write`` calls, no
``fsync``) and prints the kernel CPU time each step took per MiB, in four
rounds: on a cold start; right after deleting what the first round wrote; 10 s
after deleting it; 60 s after.  On bare metal every step costs about the same
(copying into the page cache).  In a virtual machine whose host takes back the
memory its guest frees (virtio-balloon free page reporting), a page the guest
had not touched since it was given back costs a fault on the host the first
time it is written, and the steps past the memory the guest still holds cost
many times more.  An HDFS cluster on one machine writes every byte once per
replica, so it meets that cost three times as early as a server keeping one
copy; ``bench/dicom_services.py --cluster --replication 3,1`` shows what it
does to ingest.  The files go to ``--dir`` (default: a temp folder on the
file system of this checkout, where ``deploy/`` keeps the DataNodes' blocks)
and are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

STEP_MB = 256


def write_steps(folder: Path, steps: int, chunk: bytes) -> list[float]:
    """Kernel ms per MiB of each step of STEP_MB new file data."""
    costs = []
    for i in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        fd = os.open(folder / f"step{i}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for _ in range(STEP_MB):
                os.write(fd, chunk)
        finally:
            os.close(fd)
        costs.append((resource.getrusage(resource.RUSAGE_SELF).ru_stime - before) * 1e3 / STEP_MB)
    return costs


def delete_steps(folder: Path, steps: int) -> None:
    for i in range(steps):
        (folder / f"step{i}.bin").unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=3.0, help="GiB written per round (default 3)")
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1],
                        help="where the temp folder goes (default: this checkout's file system)")
    args = parser.parse_args()
    steps = max(1, round(args.gb * 1024 / STEP_MB))
    folder = Path(tempfile.mkdtemp(prefix=".page-cache-bench-", dir=args.dir))
    chunk = os.urandom(1 << 20)
    print(f"kernel ms per MiB written, {STEP_MB} MiB steps, {steps * STEP_MB / 1024:.1f} GiB per round, "
          f"{os.cpu_count()} cores, into {folder}")
    try:
        for label, wait_s in (("first", None), ("right after deleting", 0), ("10 s after deleting", 10),
                              ("60 s after deleting", 60)):
            if wait_s is not None:
                delete_steps(folder, steps)
                time.sleep(wait_s)
            costs = write_steps(folder, steps, chunk)
            print(f"{label:>22}: " + " ".join(f"{c:.1f}" for c in costs), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
