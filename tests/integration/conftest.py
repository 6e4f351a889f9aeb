"""Fixtures for the real stack: HDFS (NameNode + 3 DataNodes) and Postgres.

The servers are started by ``deploy/hdfs.sh up`` and ``deploy/postgres.sh up``
(``.ci/run`` does both).  Without ``PACS_REQUIRE_STACK=1`` a test whose server
is not reachable is skipped; with it (as in CI) that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from pacs.devstack import HDFS_URL, PG_URL, WEBHDFS_URL, empty_database, reachable
from pacs.services import build_services
from pacs.settings import Settings

REPO = Path(__file__).resolve().parents[2]
# The environment the stack was started with (ports, stack folder), kept before
# the per-test fixture clears PACS_* variables.
STACK_ENV = dict(os.environ)


def _need(url: str, what: str) -> None:
    if reachable(url):
        return
    message = f"{what} is not reachable at {url}; start it with deploy/{what.lower()}.sh up"
    if STACK_ENV.get("PACS_REQUIRE_STACK") == "1":
        pytest.fail(message)
    pytest.skip(message)


def deploy(script: str, *args: str) -> str:
    """Run a deploy/ script (used by fault-injection tests); return its output."""
    done = subprocess.run(
        ["bash", str(REPO / "deploy" / script), *args], capture_output=True, text=True, timeout=300, env=STACK_ENV
    )
    if done.returncode != 0:
        raise RuntimeError(f"deploy/{script} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@pytest.fixture
def hdfs_root() -> str:
    """A fresh folder on HDFS for one test, removed afterwards."""
    _need(HDFS_URL, "HDFS")
    root = f"/pacs-test/{uuid.uuid4().hex[:12]}"
    yield root
    import hdfs_native

    try:
        hdfs_native.Client(HDFS_URL).delete(root, recursive=True)
    except Exception:
        pass


@pytest.fixture
def pg_url() -> str:
    """The Postgres index, emptied (all tables dropped) for one test."""
    _need(PG_URL, "Postgres")
    empty_database(PG_URL)
    return PG_URL


def cluster_settings(tmp_path, hdfs_root: str, pg_url: str, **storage) -> Settings:
    values = dict(backend="hdfs", hdfs_url=HDFS_URL, webhdfs_url=WEBHDFS_URL, hdfs_root=hdfs_root, replication=3,
                  hdfs_timeout_s=10)
    values.update(storage)
    return Settings(data_dir=tmp_path / "data", storage=values, index={"url": pg_url})


@pytest.fixture
def cluster(tmp_path, hdfs_root, pg_url):
    """Services on HDFS (replication 3) + Postgres."""
    services = build_services(cluster_settings(tmp_path, hdfs_root, pg_url))
    yield services
    services.close()
