from __future__ import annotations

import logging
import os
import shutil
import socket

import pytest

from pacs.services import build_services
from pacs.settings import Settings


@pytest.fixture
def local_settings(tmp_path) -> Settings:
    """The embedded default (local files + SQLite) under a fresh folder."""
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def embedded(local_settings):
    services = build_services(local_settings)
    yield services
    services.close()


@pytest.fixture
def scp(embedded):
    """The archive's SCP on the embedded default, on a free port; records the associations it accepts."""
    server, accepted = start_recorded_scp(embedded, network_timeout_s=1.0)
    yield embedded, accepted
    server.shutdown()


def start_recorded_scp(services, *, network_timeout_s: float):  # noqa: ANN001, ANN201 - (server, accepted list)
    """Start the archive's SCP on a free port with these ACSE/DIMSE/network timeouts; the list gets
    each association it accepts."""
    from pynetdicom import evt

    from pacs.net.scp import start_scp

    services.settings.dicom.port = free_port()
    services.settings.dicom.network_timeout_s = network_timeout_s
    server = start_scp(services)
    accepted = []
    server.bind(evt.EVT_CONN_OPEN, lambda event: accepted.append(event.assoc))
    return server, accepted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True, scope="session")
def _hermetic():
    """Tests build their Settings explicitly: no PACS_* variable of the shell leaks in.

    Session-scoped so that module-scoped fixtures, which run before any
    function-scoped one, see the cleaned environment too.  The stack's
    variables stay available to tests through ``tests.integration.conftest.STACK_ENV``
    and ``pacs.devstack``, read at import time.
    """
    patch = pytest.MonkeyPatch()
    for name in list(os.environ):
        if name.startswith("PACS_"):
            patch.delenv(name)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def spark():
    """One Spark session in local mode with 2 slots for a test module (start-up costs several seconds)."""
    if shutil.which("java") is None:
        pytest.skip("Spark needs Java 17+ (java not on PATH)")
    from pacs.spark import spark_session

    with spark_session("local[2]", "pacs unit tests") as session:
        yield session
