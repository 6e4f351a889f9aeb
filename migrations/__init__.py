"""Alembic migrations of the index schema (run them with ``pacs db upgrade``)."""
