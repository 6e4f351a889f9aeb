"""The archive's domain exceptions.

Protocol layers map them to their own statuses in one place each: DIMSE
statuses in ``pacs.net.status`` and HTTP statuses in ``api``.
"""

from __future__ import annotations


class PacsError(Exception):
    """Base of every error the archive raises on purpose."""


class InvalidObject(PacsError):
    """The bytes offered to ingest are not an acceptable DICOM object.

    Maps to "cannot understand" (0xC000) in DIMSE and 400 in HTTP.
    """


class ObjectTooLarge(InvalidObject):
    """The object is larger than ``storage.max_object_mb``."""


class DuplicateConflict(PacsError):
    """A SOP Instance UID arrived again with different bytes and the policy rejects it."""


class StorageUnavailable(PacsError):
    """The bulk store could not durably write or read (maps to 0xA700 / 503)."""


class IndexUnavailable(PacsError):
    """The index database could not commit or answer (maps to 0xA700 / 503)."""


class IndexConflict(IndexUnavailable):
    """The index rolled a transaction back for a conflict with a concurrent one (a deadlock, a
    serialization failure): the transaction may simply be run again."""


class ChecksumMismatch(PacsError):
    """Bytes read back from the store do not match the checksum in the index."""


class NotFound(PacsError):
    """No object with that key exists."""


class InvalidQuery(PacsError):
    """A matching key or value is not allowed (maps to 0xA900 / 400)."""


class SparkUnavailable(PacsError):
    """No Spark master answers at the configured URL, or Spark cannot start."""


class JobFailed(PacsError):
    """A processing job (reconstruction, denoising) failed while it ran."""
