"""Ingest throughput through the ingest service, embedded default vs HDFS + Postgres.

    .venv/bin/python bench/ingest_storage.py [--count 500] [--threads 1 4]

Stores ``--count`` synthetic CT instances of 512x512x16-bit (~0.5 MB each)
through :class:`pacs.ingest.service.IngestService` — structure check, header
parse, SHA-256, durable write, index commit — into (i) local files + SQLite and
(ii) HDFS (replication 3, the cluster of ``deploy/hdfs.sh``) + Postgres
(``deploy/postgres.sh``), then compacts, and prints objects/s, MB/s and the
HDFS files created.  The cluster part is skipped with a message when the
stack is not up.  Instances are generated in memory before the clock starts.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pacs.devstack import (  # noqa: E402
    HDFS_URL,
    PG_URL,
    empty_database,
    forget_shell_settings,
    reachable,
    remove_hdfs_tree,
)

forget_shell_settings()  # "local + SQLite" means that, whatever the shell exports
from pacs.services import build_services  # noqa: E402
from pacs.settings import Settings  # noqa: E402
from pacs.synthetic import SeriesSpec, make_series  # noqa: E402

def run(label: str, settings: Settings, instances: list[bytes], threads: int) -> dict:
    services = build_services(settings)
    total_bytes = sum(len(b) for b in instances)
    started = time.perf_counter()
    if threads == 1:
        for data in instances:
            services.ingest.store(data, source_ae="BENCH")
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda b: services.ingest.store(b, source_ae="BENCH"), instances))
    elapsed = time.perf_counter() - started
    services.compactor.wait()
    files_after_ingest = sum(1 for _ in services.objects.blobs.list(""))
    compact_started = time.perf_counter()
    services.compactor.compact(force=True)
    compact_s = time.perf_counter() - compact_started
    files_at_rest = sum(1 for _ in services.objects.blobs.list(""))
    services.close()
    return dict(
        label=label, threads=threads, n=len(instances), seconds=elapsed,
        per_s=len(instances) / elapsed, mb_s=total_bytes / elapsed / 1e6,
        files_after_ingest=files_after_ingest, files_at_rest=files_at_rest, compact_s=compact_s,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500, help="instances per run (default 500)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="concurrent storing threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"generating {args.count} CT instances of 512x512x16-bit ...", flush=True)
    instances = list(make_series(SeriesSpec(study_key=f"bench-{uuid.uuid4().hex[:8]}", series_key="s1",
                                            rows=512, columns=512, count=args.count)))
    print(f"{sum(map(len, instances)) / 1e6:.1f} MB in memory\n", flush=True)

    results = []
    for threads in args.threads:
        workdir = Path(tempfile.mkdtemp(prefix="pacs-bench-"))
        try:
            results.append(run("local + SQLite", Settings(data_dir=workdir), instances, threads))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if reachable(HDFS_URL) and reachable(PG_URL):
            empty_database(PG_URL)
            root = f"/pacs-bench/{uuid.uuid4().hex[:8]}"
            settings = Settings(
                data_dir=Path(tempfile.mkdtemp(prefix="pacs-bench-")),
                storage=dict(backend="hdfs", hdfs_url=HDFS_URL, hdfs_root=root, replication=3),
                index=dict(url=PG_URL),
            )
            try:
                results.append(run("HDFS (r=3) + Postgres", settings, instances, threads))
            finally:
                remove_hdfs_tree(root)
                shutil.rmtree(settings.data_dir, ignore_errors=True)
        else:
            print(f"HDFS ({HDFS_URL}) or Postgres ({PG_URL}) not reachable: cluster run skipped "
                  "(start them with deploy/hdfs.sh up and deploy/postgres.sh up)")

    print(f"{'backend':<24}{'threads':>8}{'objects/s':>11}{'MB/s':>8}{'files after':>13}{'files at':>10}{'compact':>9}")
    print(f"{'':<24}{'':>8}{'':>11}{'':>8}{'ingest':>13}{'rest':>10}{'s':>9}")
    for r in results:
        print(f"{r['label']:<24}{r['threads']:>8}{r['per_s']:>11.1f}{r['mb_s']:>8.1f}"
              f"{r['files_after_ingest']:>13}{r['files_at_rest']:>10}{r['compact_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
