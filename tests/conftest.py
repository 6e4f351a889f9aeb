from __future__ import annotations

import logging

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
def _quiet_alembic():
    logging.getLogger("alembic").setLevel(logging.WARNING)
