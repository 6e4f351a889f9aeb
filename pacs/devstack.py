"""Helpers for the development stack that ``deploy/`` starts (tests and benchmarks).

Not used by the service itself.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

HDFS_URL = os.environ.get("PACS_HDFS_URL", "hdfs://127.0.0.1:19000")
WEBHDFS_URL = os.environ.get("PACS_HDFS_WEBHDFS_URL", "http://127.0.0.1:19870")
PG_URL = os.environ.get("PACS_INDEX_URL", "postgresql+psycopg2://pacs:pacs@127.0.0.1:55432/pacs")


def forget_shell_settings() -> None:
    """Remove every ``PACS_*`` variable from this process's environment.

    For benchmarks: the stack's URLs above are read already, and from here on
    a ``Settings()`` (or a ``pacs`` child process) sees only what the caller
    passes, so the embedded default is local files + SQLite even in a shell
    that exported ``deploy/postgres.sh env``.
    """
    for name in [n for n in os.environ if n.startswith("PACS_")]:
        del os.environ[name]


def reachable(url: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at the host and port of ``url``."""
    parsed = urlparse(url.replace("postgresql+psycopg2", "postgresql"))
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
            return True
    except OSError:
        return False


def empty_database(url: str) -> None:
    """Drop every table of the database at ``url`` (a throw-away test database!)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def remove_hdfs_tree(path: str, url: str = WEBHDFS_URL) -> None:
    """Delete ``path`` and everything under it on the stack's HDFS (no trash).

    Benchmarks store gigabytes per run, times the replication factor; left
    behind, a few runs fill the disk of a small machine.
    """
    import hdfs  # HdfsCLI over WebHDFS: plain HTTP, nothing to tear down

    hdfs.InsecureClient(url, user=os.environ.get("USER", "root")).delete(path, recursive=True)


def namenode_bean(name: str, url: str = WEBHDFS_URL) -> dict:
    """One of the NameNode's JMX beans (``FSNamesystem``, ``FSNamesystemState``, ...), from its HTTP address."""
    import json
    import urllib.request

    query = f"{url}/jmx?qry=Hadoop:service=NameNode,name={name}"
    with urllib.request.urlopen(query, timeout=10) as response:
        beans = json.load(response)["beans"]
    if not beans:
        raise RuntimeError(f"no {name} bean at {query}")
    return beans[0]


def hdfs_pending_deletions(url: str = WEBHDFS_URL) -> int:
    """Blocks of deleted files the NameNode has yet to tell a DataNode to delete."""
    return int(namenode_bean("FSNamesystem", url)["PendingDeletionBlocks"])
