"""The one place where the archive's errors become DIMSE statuses (PS3.4 B.2.3, PS3.7 C)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom.status import Status

from pacs.errors import (
    DuplicateConflict,
    IndexUnavailable,
    InvalidObject,
    ObjectTooLarge,
    StorageUnavailable,
)

# Named codes pynetdicom's Status enum lacks, added once under readable names.
for _name, _code in (
    ("OUT_OF_RESOURCES", 0xA700),  # Storage: Refused, out of resources
    ("CANNOT_UNDERSTAND", 0xC000),  # Storage: Error, cannot understand
    ("PROCESSING_FAILURE", 0x0110),  # General: processing failure
    ("DUPLICATE_SOP_INSTANCE", 0x0111),  # General: duplicate SOP instance
    ("NOT_AUTHORIZED", 0x0124),  # General: refused, not authorised
):
    if not hasattr(Status, _name):
        Status.add(_name, _code)


def store_failure(exc: BaseException) -> Dataset:
    """The C-STORE response status for an exception raised by ingest."""
    if isinstance(exc, ObjectTooLarge):
        code = Status.OUT_OF_RESOURCES
    elif isinstance(exc, InvalidObject):
        code = Status.CANNOT_UNDERSTAND
    elif isinstance(exc, DuplicateConflict):
        code = Status.DUPLICATE_SOP_INSTANCE
    elif isinstance(exc, (StorageUnavailable, IndexUnavailable)):
        code = Status.OUT_OF_RESOURCES
    else:
        code = Status.PROCESSING_FAILURE
    return status_dataset(int(code), str(exc))


def status_dataset(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        # ErrorComment (0000,0902) is LO: at most 64 characters.
        status.ErrorComment = comment[:64]
    return status
