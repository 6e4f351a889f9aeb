"""The ``pacs`` command."""
