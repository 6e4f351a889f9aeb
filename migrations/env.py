"""Alembic environment: the database URL comes from the archive's Settings."""

from __future__ import annotations

from alembic import context

from pacs.index.database import make_engine
from pacs.index.models import Base
from pacs.settings import load_settings

config = context.config
url = config.attributes.get("url") or load_settings().index_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection) -> None:  # noqa: ANN001
    # Batch mode lets ALTERs work on SQLite, which cannot alter most constraints in place.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
