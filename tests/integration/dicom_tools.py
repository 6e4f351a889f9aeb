"""Shared pieces of the tests that use dcmtk's command-line tools as the DICOM peer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import free_port  # noqa: F401 - the integration modules import it from here

#: The environment for dcmtk tools: no PACS_* settings, and TCP_NODELAY on (dcmtk sets
#: it only when asked, and without it every response waits for a delayed ACK).
DCMTK_ENV = {name: value for name, value in os.environ.items() if not name.startswith("PACS_")}
DCMTK_ENV["TCP_NODELAY"] = "1"

#: Marks for a module that needs dcmtk; missing tools fail instead of skipping in CI.
NEEDS_DCMTK = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(shutil.which("storescu") is None and os.environ.get("PACS_REQUIRE_STACK") != "1",
                       reason="dcmtk is not installed (apt-get install dcmtk)"),
]


def wait_for_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on port {port} after {timeout_s} s") from None
            time.sleep(0.1)


@contextmanager
def storescp(ae_title: str, out_dir: Path, *options: str) -> Iterator[int]:
    """dcmtk's storescp accepting every transfer syntax into ``out_dir``; yields its port."""
    port = free_port()
    process = subprocess.Popen(["storescp", "-aet", ae_title, "+xa", *options, "-od", str(out_dir), str(port)],
                               env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()  # by the PID we started
        process.wait(timeout=10)
