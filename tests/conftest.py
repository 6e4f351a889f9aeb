from __future__ import annotations

import logging
import os

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


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch):
    """Tests build their Settings explicitly: no PACS_* variable of the shell leaks in."""
    for name in list(os.environ):
        if name.startswith("PACS_"):
            monkeypatch.delenv(name)
    logging.getLogger("alembic").setLevel(logging.WARNING)
