"""What every association the archive takes part in gets when its connection opens.

* TCP_NODELAY: without it every response waits for the peer's delayed ACK
  (~40 ms per message).
* ``send_c_store`` that sends a stored object unparsed (``pacs.net.stored``).
* On associations the archive requests (C-MOVE sub-associations, ``pacs
  push``/``echo``), a guard against a race in pynetdicom's request methods:
  ``send_c_store`` pauses the association's reactor thread by clearing a
  checkpoint and then waits for the reactor's ``_is_paused`` flag, but that
  flag can still be ``True`` from the reactor's previous pause while the
  reactor is already running again.  The reactor then takes the peer's
  response off the queue itself, and the sender waits out the whole DIMSE
  timeout — seen as C-MOVEs that stall for a minute once TCP_NODELAY makes
  responses arrive within the window.  The guard clears the flag first and
  waits until the reactor sets it anew, which it does only right before
  blocking on the (cleared) checkpoint.
"""

from __future__ import annotations

import functools
import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.association import Association

from pacs.net.reactor import hold_reactor
from pacs.net.retrieve import serving_retrieves
from pacs.net.stored import sending_stored


def handle_connection_open(event: evt.Event) -> None:
    assoc = event.assoc
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Retrieves and pushes hand over stored objects unparsed (pacs.net.stored).
    assoc.send_c_store = sending_stored(assoc, assoc.send_c_store)
    # C-GET and C-MOVE requests it accepts are served by the archive's sub-operation loop (pacs.net.retrieve).
    assoc._serve_request = serving_retrieves(assoc, assoc._serve_request)
    if assoc.is_requestor:
        for name in ("send_c_store", "send_c_echo"):
            setattr(assoc, name, _holding_reactor(assoc, getattr(assoc, name)))


def _holding_reactor(assoc: Association, send: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(send)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        hold_reactor(assoc)
        return send(*args, **kwargs)

    return guarded


def configure_pynetdicom_logging(log_level: str) -> None:
    """pynetdicom's per-message logging only when the archive logs at DEBUG.

    Its standard handlers format every DIMSE message and, separately, every
    C-FIND response identifier even when nothing is logged — about a tenth of
    the time of a large C-FIND.  The archive logs one line per operation.
    """
    verbose = log_level.upper() == "DEBUG"
    _config.LOG_HANDLER_LEVEL = "standard" if verbose else "none"
    _config.LOG_REQUEST_IDENTIFIERS = verbose
    _config.LOG_RESPONSE_IDENTIFIERS = verbose
    for name in ("pynetdicom.dul", "pynetdicom.utils"):
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(_DECODE_TRACEBACKS)
        else:
            logger.addFilter(_DECODE_TRACEBACKS)  # once: a filter already there is not added again


class _DecodeTracebacks(logging.Filter):
    """pynetdicom's tracebacks for a PDU it cannot decode, left out unless the archive logs at DEBUG.

    For one malformed A-ASSOCIATE-RQ (a port scan, a peer that is not DICOM)
    pynetdicom logs two tracebacks and no peer: one for each text codec that
    failed on an AE title (which it logs even when a fallback codec then
    succeeds), one more for the PDU.  The archive logs one line with the peer,
    the PDU type and the reason instead (``EventDrivenDUL._decode_pdu``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pynetdicom.utils":
            return not (record.exc_info and isinstance(record.exc_info[1], UnicodeError))
        return not getattr(sys.exc_info()[1], "pacs_logged", False)  # logged while handling the one reported


_DECODE_TRACEBACKS = _DecodeTracebacks()


# For associations the archive requests.
REQUESTOR_HANDLERS = [(evt.EVT_CONN_OPEN, handle_connection_open)]
